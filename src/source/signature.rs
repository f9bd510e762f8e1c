//! SSH commit signatures (`git config gpg.format ssh`): check a commit's `gpgsig` against an
//! OpenSSH `allowed_signers` file, as `git verify-commit` does with `gpg.ssh.allowedSignersFile`.
//!
//! Supports ed25519 and RSA (`rsa-sha2-256`/`rsa-sha2-512`) keys, namespace `git`, and plain
//! allowed_signers lines (`principals [namespaces="git"] keytype base64`); certificate
//! authorities and validity options are not supported and such lines never match.

use std::path::Path;

use ring::signature;
use sha2::{Digest, Sha256, Sha512};

/// An allowed signer: principals and the public key blob.
#[derive(Debug, Clone)]
pub struct Signer {
    pub principals: String,
    key: Vec<u8>,
}

/// Parse an allowed_signers file.
pub fn load_allowed_signers(path: &Path) -> Result<Vec<Signer>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read allowed signers {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let toks: Vec<&str> = line.split_whitespace().collect();
        if toks.len() < 3 {
            continue;
        }
        let is_type =
            |t: &str| t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-");
        let (opts, b64) = if is_type(toks[1]) {
            ("", toks[2])
        } else if toks.len() >= 4 && is_type(toks[2]) {
            (toks[1], toks[3])
        } else {
            continue;
        };
        if opts.contains("cert-authority") || opts.contains("valid-") {
            continue;
        }
        if opts.contains("namespaces=")
            && !opts.split(',').any(|o| {
                o.strip_prefix("namespaces=")
                    .map(|v| v.trim_matches('"').split(',').any(|n| n == "git"))
                    .unwrap_or(false)
            })
        {
            continue;
        }
        if let Some(key) = unbase64(b64) {
            out.push(Signer {
                principals: toks[0].to_string(),
                key,
            });
        }
    }
    Ok(out)
}

/// Verify an armored SSH signature over `data`. `Ok` names the signer's principals.
pub fn verify(armored: &[u8], data: &[u8], signers: &[Signer]) -> Result<String, String> {
    let text = std::str::from_utf8(armored).map_err(|_| "signature is not text".to_string())?;
    let body: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "-----BEGIN SSH SIGNATURE-----")
        .skip(1)
        .take_while(|l| *l != "-----END SSH SIGNATURE-----")
        .collect();
    if body.is_empty() {
        return Err("the commit is not signed with an SSH signature".into());
    }
    let blob = unbase64(&body).ok_or("the SSH signature is not valid base64")?;
    let mut r = Reader(&blob);
    if r.bytes(6)? != b"SSHSIG" {
        return Err("not an SSHSIG signature".into());
    }
    if r.u32()? != 1 {
        return Err("unsupported SSHSIG version".into());
    }
    let pubkey = r.string()?.to_vec();
    let namespace = r.string()?;
    let reserved = r.string()?;
    let hash_alg = r.string()?;
    let sig = r.string()?;
    if namespace != b"git" {
        return Err("the signature's namespace is not `git`".into());
    }
    let signer = signers
        .iter()
        .find(|s| s.key == pubkey)
        .ok_or("the signing key is not in the allowed signers file")?;
    let digest: Vec<u8> = match hash_alg {
        b"sha512" => Sha512::digest(data).to_vec(),
        b"sha256" => Sha256::digest(data).to_vec(),
        _ => return Err("unsupported signature hash algorithm".into()),
    };
    let mut signed = b"SSHSIG".to_vec();
    for field in [namespace, reserved, hash_alg, &digest[..]] {
        signed.extend_from_slice(&(field.len() as u32).to_be_bytes());
        signed.extend_from_slice(field);
    }
    let mut k = Reader(&pubkey);
    let key_type = k.string()?;
    let mut s = Reader(sig);
    let sig_type = s.string()?;
    let sig_bytes = s.string()?;
    let ok = match (key_type, sig_type) {
        (b"ssh-ed25519", b"ssh-ed25519") => {
            let key = k.string()?;
            signature::UnparsedPublicKey::new(&signature::ED25519, key)
                .verify(&signed, sig_bytes)
                .is_ok()
        }
        (b"ssh-rsa", b"rsa-sha2-512" | b"rsa-sha2-256") => {
            let e = k.string()?;
            let n = k.string()?;
            let alg = if sig_type == b"rsa-sha2-512" {
                &signature::RSA_PKCS1_2048_8192_SHA512
            } else {
                &signature::RSA_PKCS1_2048_8192_SHA256
            };
            signature::RsaPublicKeyComponents {
                n: strip_zero(n),
                e: strip_zero(e),
            }
            .verify(alg, &signed, sig_bytes)
            .is_ok()
        }
        _ => return Err("unsupported SSH key or signature type".into()),
    };
    if ok {
        Ok(signer.principals.clone())
    } else {
        Err("the SSH signature does not verify".into())
    }
}

fn strip_zero(b: &[u8]) -> &[u8] {
    match b.iter().position(|x| *x != 0) {
        Some(i) => &b[i..],
        None => b,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated SSH signature".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
}

fn unbase64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine;
    // Armored signatures and key files are written with padding; accept them without too.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    LENIENT.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes() {
        assert_eq!(unbase64("Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(unbase64("Zm8=").unwrap(), b"fo");
        assert_eq!(unbase64("Zm8").unwrap(), b"fo");
        assert!(unbase64("Zm*").is_none());
    }

    #[test]
    fn unsigned_text_is_refused() {
        assert!(verify(b"-----BEGIN PGP SIGNATURE-----\n", b"x", &[]).is_err());
    }
}
