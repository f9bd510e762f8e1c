#!/usr/bin/env bash
# Post BODY_FILE as a merge-request note, or update the note this script posted before
# (found by the `<!-- legate-diff -->` marker).
# Env: GITLAB_TOKEN, CI_API_V4_URL, CI_PROJECT_ID, CI_MERGE_REQUEST_IID (set by GitLab CI).
set -euo pipefail
body_file=${1:?usage: gitlab-mr-comment.sh BODY_FILE}
api=${CI_API_V4_URL:?}
marker='<!-- legate-diff -->'
auth=(-H "PRIVATE-TOKEN: ${GITLAB_TOKEN:?}")
base="$api/projects/${CI_PROJECT_ID:?}/merge_requests/${CI_MERGE_REQUEST_IID:?}/notes"
payload=$(python3 -c 'import json,sys; print(json.dumps({"body": open(sys.argv[1]).read()}))' "$body_file")
existing=$(curl -fsS "${auth[@]}" "$base?per_page=100" |
  python3 -c 'import json,sys; m=sys.argv[1]; print(next((str(c["id"]) for c in json.load(sys.stdin) if m in (c.get("body") or "")), ""))' "$marker")
if [ -n "$existing" ]; then
  curl -fsS -X PUT "${auth[@]}" -H "Content-Type: application/json" "$base/$existing" -d "$payload" >/dev/null
  echo "updated note $existing"
else
  curl -fsS -X POST "${auth[@]}" -H "Content-Type: application/json" "$base" -d "$payload" >/dev/null
  echo "posted a new note"
fi
