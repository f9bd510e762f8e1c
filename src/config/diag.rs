//! Diagnostics: what is wrong (or worth knowing), where, and what to do about it.

use std::fmt;

use serde::Serialize;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informational: something was skipped on purpose.
    Note,
    /// Loads, but probably not what was meant. An error under `--strict`.
    Warning,
    /// The revision cannot be applied.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One finding, located as precisely as the input allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Hash)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable identifier of the kind of finding (`unknown-field`, `duplicate-resource`, ...).
    pub code: &'static str,
    /// Path relative to the config root.
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// JSON pointer into the document ("" when the finding is about the whole file).
    pub pointer: String,
    pub message: String,
    /// What to do, when there is something specific to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(
        severity: Severity,
        code: &'static str,
        loc: &Location,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity,
            code,
            file: loc.file.clone(),
            line: loc.line,
            column: loc.column,
            pointer: loc.pointer.clone(),
            message: message.into(),
            help: None,
        }
    }

    pub fn error(code: &'static str, loc: &Location, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, loc, message)
    }

    pub fn warning(code: &'static str, loc: &Location, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, loc, message)
    }

    pub fn note(code: &'static str, loc: &Location, message: impl Into<String>) -> Self {
        Self::new(Severity::Note, code, loc, message)
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}[{}]: {}",
            self.file, self.line, self.column, self.severity, self.code, self.message
        )?;
        if !self.pointer.is_empty() {
            write!(f, " (at {})", self.pointer)?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n    help: {help}")?;
        }
        Ok(())
    }
}

/// Where something is: a file, a position in it, and a JSON pointer into its document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub pointer: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(&lower, &c.to_ascii_lowercase());
        let dist = strsim::damerau_levenshtein(&lower, &c.to_ascii_lowercase());
        let close = score >= 0.85 || dist <= 2.max(c.len() / 5);
        if close && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Counts by severity, for summaries and exit codes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub errors: usize,
    pub warnings: usize,
    pub notes: usize,
}

impl Counts {
    pub fn of(diags: &[Diagnostic]) -> Counts {
        let mut c = Counts::default();
        for d in diags {
            match d.severity {
                Severity::Error => c.errors += 1,
                Severity::Warning => c.warnings += 1,
                Severity::Note => c.notes += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let fields = ["hostname", "prefix", "service", "rewrite"];
        assert_eq!(did_you_mean("hosname", fields), Some("hostname"));
        assert_eq!(did_you_mean("prefx", fields), Some("prefix"));
        assert_eq!(did_you_mean("servce", fields), Some("service"));
        assert_eq!(did_you_mean("banana", fields), None);
    }
}
