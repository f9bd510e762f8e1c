#!/usr/bin/env bash
# Post BODY_FILE as a pull-request comment, or update the comment this script posted before
# (found by the `<!-- legate-diff -->` marker that `legate diff --format markdown` writes).
# Env: GITHUB_TOKEN, GITHUB_REPOSITORY (owner/repo), PR_NUMBER, GITHUB_API_URL (set by Actions).
set -euo pipefail
body_file=${1:?usage: github-pr-comment.sh BODY_FILE}
api=${GITHUB_API_URL:-https://api.github.com}
marker='<!-- legate-diff -->'
auth=(-H "Authorization: Bearer ${GITHUB_TOKEN:?}" -H "Accept: application/vnd.github+json")
payload=$(python3 -c 'import json,sys; print(json.dumps({"body": open(sys.argv[1]).read()}))' "$body_file")
existing=$(curl -fsS "${auth[@]}" "$api/repos/${GITHUB_REPOSITORY:?}/issues/${PR_NUMBER:?}/comments?per_page=100" |
  python3 -c 'import json,sys; m=sys.argv[1]; print(next((str(c["id"]) for c in json.load(sys.stdin) if m in (c.get("body") or "")), ""))' "$marker")
if [ -n "$existing" ]; then
  curl -fsS -X PATCH "${auth[@]}" -H "Content-Type: application/json" \
    "$api/repos/$GITHUB_REPOSITORY/issues/comments/$existing" -d "$payload" >/dev/null
  echo "updated comment $existing"
else
  curl -fsS -X POST "${auth[@]}" -H "Content-Type: application/json" \
    "$api/repos/$GITHUB_REPOSITORY/issues/$PR_NUMBER/comments" -d "$payload" >/dev/null
  echo "posted a new comment"
fi
