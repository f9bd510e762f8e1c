"""Drive the Legate dashboard in headless Chromium (Selenium), as tests/it/dashboard.rs asks.

Usage: dashboard.py check
       dashboard.py run ADMIN_URL REPO_DIR TOKEN SCREENSHOT_PNG

`run` expects the gateway to follow REPO_DIR's `main` (one good commit live) and makes the
next commits itself with the git CLI: a good one (must appear live, with its route diff), a
rejected one (its diagnostics must show), then pins the first revision with the token (the
mode must change). Prints one `ok ...` line per step; exits non-zero with the reason on failure.
"""

import os
import subprocess
import sys
import time


def check():
    import selenium  # noqa: F401

    for tool in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not os.path.exists(tool):
            sys.exit(f"{tool} is missing")
    if selenium.__version__ != "4.51.0":
        print(f"note: selenium {selenium.__version__}, tested with 4.51.0", file=sys.stderr)


def git(repo, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="Grace", GIT_AUTHOR_EMAIL="grace@example.test",
               GIT_COMMITTER_NAME="Grace", GIT_COMMITTER_EMAIL="grace@example.test",
               GIT_CONFIG_NOSYSTEM="1", HOME=repo)
    out = subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=repo, env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def commit(repo, name, text, message):
    with open(os.path.join(repo, name), "w") as f:
        f.write(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


MAPPING = """---
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata:
  name: {name}
spec:
  hostname: "*"
  prefix: {prefix}
  service: {service}
"""


def run(admin, repo, token, shot):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1500", "--no-first-run", "--disable-extensions",
              "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    wait = WebDriverWait(driver, 30, poll_frequency=0.1)

    def text(css):
        try:
            return driver.find_element(By.CSS_SELECTOR, css).text
        except Exception:
            return ""

    def until(what, cond):
        try:
            wait.until(lambda d: cond())
        except Exception:
            sys.exit(f"timed out waiting for {what}; live={text('#live-revision')!r} "
                     f"state={text('#live-state')!r} mode={text('#mode')!r} "
                     f"attempt={text('#attempt-outcome')!r} result={text('#action-result')!r} "
                     f"conn={text('#conn')!r} explain={text('#explain-out')!r} "
                     f"diagnostics={text('#diagnostics')!r}")
        print("ok", what, flush=True)

    try:
        first = git(repo, "rev-parse", "HEAD")
        driver.get(admin + "/")  # redirects to /ui/
        until("the page loads with the live revision",
              lambda: driver.current_url.endswith("/ui/") and text("#live-revision") == first[:12])
        until("the live state is verified", lambda: text("#live-state") == "verified")
        until("the mode is following", lambda: text("#mode") == "following")
        until("the route table lists the first Mapping",
              lambda: "default/echo" in text("#route-tables"))
        until("traffic shows the requests sent to the echo route",
              lambda: "echo" in text("#traffic tbody"))

        # A new commit appears live, in the history, with its route diff.
        second = commit(repo, "more.yaml",
                        MAPPING.format(name="orders", prefix="/orders/", service="orders:8080"),
                        "Add the orders route")
        until("a new commit goes live", lambda: text("#live-revision") == second[:12])
        until("the history shows its commit and author",
              lambda: "Add the orders route" in text(f'#history tr[data-revision="{second}"]')
              and "Grace" in text(f'#history tr[data-revision="{second}"]'))
        driver.find_element(By.CSS_SELECTOR, f'#history button.link[data-revision="{second}"]').click()
        until("the route diff of the new commit names the added Mapping",
              lambda: "default/orders" in text("#diff-text") and first[:12] in text("#diff-title"))

        # The route filter and the explain form.
        f = driver.find_element(By.ID, "filter")
        f.send_keys("orders")
        until("the filter keeps only matching routes",
              lambda: "default/orders" in text("#route-tables")
              and "default/echo" not in text("#route-tables"))
        f.clear()
        p = driver.find_element(By.ID, "explain-path")
        p.clear()
        p.send_keys("/echo/42")
        driver.find_element(By.CSS_SELECTOR, "#explain-form button").click()
        until("explain names the winner and why earlier candidates lost",
              lambda: "served by default/echo" in text("#explain-verdict")
              and "lost: path /echo/42 does not start with /orders/" in text("#explain-out"))

        # A rejected commit: its diagnostics show, the previous revision keeps serving.
        bad = commit(repo, "broken.yaml",
                     "---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: broken\n"
                     "spec:\n  prefix: /b/\n  service: b:80\n  retries: lots\n",
                     "Break the config")
        until("the rejected commit is the last attempt",
              lambda: text("#attempt-outcome") == "Rejected" and text("#attempt-revision") == bad[:12])
        until("its diagnostics show file:line and the message",
              lambda: "broken.yaml:" in text("#diagnostics") and "retries" in text("#diagnostics"))
        until("the head is shown out of sync, the good revision still live",
              lambda: text("#live-revision") == second[:12]
              and driver.find_element(By.ID, "out-of-sync").is_displayed())
        driver.save_screenshot(shot)
        print("ok screenshot", shot, flush=True)

        # Pinning needs the token: first without, then with it.
        pin = f'#history tr[data-revision="{first}"] button.pin'
        driver.find_element(By.CSS_SELECTOR, pin).click()
        until("pinning without the token is refused",
              lambda: "needs the admin token" in text("#action-result"))
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#login button").click()
        until("the token is kept for the tab", lambda: "token set" in text("#token-state"))
        driver.find_element(By.CSS_SELECTOR, pin).click()
        until("pinning with the token changes the mode",
              lambda: text("#mode") == f"pinned at {first[:12]}" and text("#live-revision") == first[:12])
        until("the live state says pinned", lambda: text("#live-state") == "pinned")

        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        # 401 answers are expected (the pin without a token); anything else (a CSP violation,
        # a script error) fails.
        errors = [e for e in errors if "401" not in e.get("message", "")]
        if errors:
            sys.exit(f"browser console errors: {errors}")
        print("ok no console errors", flush=True)
    finally:
        driver.quit()


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        check()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 6:
        run(*sys.argv[2:])
    else:
        sys.exit(__doc__)
