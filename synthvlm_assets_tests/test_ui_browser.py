"""The Dagster UI in a real browser (Debian's Chromium, headless, driven by Playwright) against `dagster dev`.

A person's path through the UI: open the asset graph, launch a backfill of two caption shards of
caption_curation (raw_caption_pool + curated_captions) from the materialize dialog, wait on the backfill
page for success, open `curated_captions` and read each shard's kept/rejected counts and its checks.
The counts are compared with the Parquet files, read here independently. The backfill needs the daemon
(`dagster dev` starts one). Screenshots of every step go to `$SYNTHVLM_TEST_ARTIFACTS/ui_browser`
(default: build/test-artifacts/ui_browser), with the page's HTML and the server's log on a failure.

Without Chromium or Playwright the test skips, except when SYNTHVLM_REQUIRE_BROWSER is set (.ci/run
sets it): there it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE = REPO / "data" / "coco_captions_val2017_sample.json"
SHARD_ROWS = 500
N_CAPTIONS = 3 * SHARD_ROWS  # three shards; the backfill covers the first two
TIMEOUT_MS = 30_000  # one element to appear
BACKFILL_TIMEOUT_MS = 180_000  # the backfill to finish (~1 min on 2 cores: daemon ticks, a run, curation)

pytestmark = pytest.mark.browser


def _need(why: str) -> None:
    if os.environ.get("SYNTHVLM_REQUIRE_BROWSER"):
        pytest.fail(f"browser test: {why}")
    pytest.skip(f"browser test: {why}")


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium (`apt-get install chromium`), or $SYNTHVLM_CHROMIUM; Playwright's own browser
    download is not used (its CDN is not reachable from CI)."""
    path = os.environ.get("SYNTHVLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.access(path, os.X_OK):
        _need(f"no Chromium ({path or 'none on PATH'}): apt-get install chromium, or set SYNTHVLM_CHROMIUM")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need("Playwright is not installed (the `test` extra: pip install -e '.[test]')")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_captions(path: Path, n: int) -> None:
    """The first n captions of the COCO sample, as a COCO captions file."""
    coco = json.loads(SAMPLE.read_text())
    annotations = coco["annotations"][:n]
    images = {a["image_id"] for a in annotations}
    coco["annotations"] = annotations
    coco["images"] = [i for i in coco["images"] if i["id"] in images]
    path.write_text(json.dumps(coco))


class DagsterDev:
    """`dagster dev` (webserver + daemon + code server) on 127.0.0.1 with its own DAGSTER_HOME and storage."""

    def __init__(self, tmp: Path, log_path: Path) -> None:
        home = tmp / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        self.storage_root = tmp / "synthvlm_data"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTHVLM_", "DAGSTER_"))}
        env.update(
            DAGSTER_HOME=str(home),
            SYNTHVLM_STORAGE_ROOT=str(self.storage_root),
            SYNTHVLM_SHARD_ROWS=str(SHARD_ROWS),
            # The README's UI command (the tiny preset); curation itself needs no model.
            SYNTHVLM_PRESET="tiny",
            SYNTHVLM_JUDGE_MODEL="tiny",
            SYNTHVLM_SDXL_MODEL="tiny",
            SYNTHVLM_CLIP_MODEL="tiny",
        )
        self.env = env
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        args = [
            str(BIN / "dagster"),
            "dev",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-w",
            str(REPO / "workspace.yaml"),
        ]
        # A session of its own: teardown reaches the webserver, the daemon, the code server and run workers.
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            out = json.load(response)
        assert "errors" not in out, out["errors"]
        return out["data"]

    def wait_until_loaded(self, timeout: float = 120) -> None:
        """The webserver answers and the code location is loaded (a load error fails here, with its cause)."""
        query = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
            locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dagster dev exited:\n{self.log_tail()}"
            try:
                entries = self.graphql(query)["workspaceOrError"]["locationEntries"]
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                entries = []
            for entry in entries:
                loaded = entry["locationOrLoadError"]
                if loaded and loaded["__typename"] == "PythonError":
                    raise AssertionError(f"code location {entry['name']} failed to load: {loaded['message']}")
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
            time.sleep(0.5)
        raise AssertionError(f"dagster dev did not come up in {timeout:.0f}s:\n{self.log_tail()}")

    def stop_sensors(self) -> list[str]:
        """Stop every running sensor: the automation sensor would otherwise run new shards on its own
        (and race the backfill); the test launches every run itself."""
        query = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
            sensors { name sensorState { id status } } } } } }"""
        stopped = []
        for repo in self.graphql(query)["repositoriesOrError"]["nodes"]:
            for sensor in repo["sensors"]:
                if sensor["sensorState"]["status"] == "RUNNING":
                    out = self.graphql(
                        "mutation($id: String) { stopSensor(id: $id) { __typename "
                        "... on StopSensorMutationResult { instigationState { status } } } }",
                        {"id": sensor["sensorState"]["id"]},
                    )["stopSensor"]
                    assert out["__typename"] == "StopSensorMutationResult", out
                    assert out["instigationState"]["status"] == "STOPPED", out
                    stopped.append(sensor["name"])
        return stopped

    def register(self, path: Path) -> list[str]:
        """`synthvlm register` (the CLI, as a user would); returns the shard keys in partition order."""
        args = [sys.executable, "-m", "synthvlm_assets.cli", "register", str(path)]  # this checkout's package
        out = subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        data = self.graphql(
            '{ assetNodeOrError(assetKey: {path: ["curated_captions"]}) { ... on AssetNode { partitionKeys } } }'
        )
        return data["assetNodeOrError"]["partitionKeys"]

    def check_names(self, asset: str) -> list[str]:
        """The asset's checks, as defined (the UI must list each one)."""
        data = self.graphql(
            "query($path: [String!]!) { assetNodeOrError(assetKey: {path: $path}) { ... on AssetNode {"
            " assetChecksOrError { ... on AssetChecks { checks { name } } } } } }",
            {"path": [asset]},
        )
        return sorted(c["name"] for c in data["assetNodeOrError"]["assetChecksOrError"]["checks"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # dagster dev stops its children
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its session (a run worker)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


@pytest.fixture
def artifacts() -> Path:
    base = os.environ.get("SYNTHVLM_TEST_ARTIFACTS") or REPO / "build" / "test-artifacts"
    folder = Path(base).resolve() / "ui_browser"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"\nbrowser test artifacts (screenshots, server log): {folder}")
    return folder


@pytest.fixture
def dagster_dev(tmp_path: Path, artifacts: Path, chromium: str):  # no server without a browser
    server = DagsterDev(tmp_path, artifacts / "dagster_dev.log")
    try:
        yield server
    finally:
        server.stop()


def parquet_counts(storage_root: Path, shard: str) -> tuple[int, int]:
    """kept and rejected rows of a shard, from its Parquet files (not from Dagster's metadata)."""
    folder = storage_root / "curated_captions" / shard
    return pq.read_metadata(folder / "kept.parquet").num_rows, pq.read_metadata(folder / "rejected.parquet").num_rows


def metadata_row(page, key: str):
    """The partition's metadata entry `key` with its one value (a row named "kept 446"); not a row of a table
    entry such as `samples`, whose verdict column also has cells named "kept"."""
    return page.get_by_role("row", name=re.compile(rf"^{re.escape(key)} \S+$"))


def test_backfill_two_shards_from_the_ui(
    chromium: str, dagster_dev: DagsterDev, artifacts: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    t0 = time.monotonic()
    dagster_dev.wait_until_loaded()
    stopped = dagster_dev.stop_sensors()
    assert "synthvlm_automation" in stopped, stopped
    captions = tmp_path / "captions.json"
    write_captions(captions, N_CAPTIONS)
    shards = dagster_dev.register(captions)
    assert len(shards) == 3, shards
    chosen, left_out = shards[:2], shards[2]
    checks = dagster_dev.check_names("curated_captions")
    assert checks, "curated_captions has no checks"
    dagster_dev.graphql("mutation { setNuxSeen }")  # the "join the community" dialog of a first visit
    print(f"dagster dev up, 3 shards registered: {time.monotonic() - t0:.1f}s")

    step = iter(range(1, 100))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)

        def shot(name: str) -> None:
            page.screenshot(path=artifacts / f"{next(step):02d}_{name}.png")

        try:
            # 1. The asset graph, narrowed to the caption_curation multi-asset.
            page.goto(f"{dagster_dev.url}/asset-groups")
            page.get_by_label("Search and filter assets").focus()
            selection = "key:raw_caption_pool or key:curated_captions"
            page.keyboard.type(selection)
            page.keyboard.press("Enter")
            expect(page).to_have_url(re.compile(re.escape(f"/asset-groups~{quote(selection)}")))
            expect(page.get_by_text("raw_caption_pool", exact=True).first).to_be_visible()
            expect(page.get_by_text("curated_captions", exact=True).first).to_be_visible()
            shot("asset_graph")

            # 2. The materialize dialog: two of the three shards.
            # (the button's accessible name starts with its icon's label: match its text)
            page.get_by_role("button").filter(has_text=re.compile(r"^Materialize all")).click()
            dialog = page.get_by_role("dialog")
            expect(dialog.get_by_text("Launch runs to materialize 2 assets")).to_be_visible()
            dialog.get_by_role("button", name="Custom", exact=True).click()
            # The partition picker: a menu of checkboxes (the dialog may open with every shard selected).
            dialog.get_by_role("img", name="expand_more").click()
            for key in shards:
                item = page.get_by_role("menuitem").filter(has_text=key)
                box = item.get_by_role("checkbox")  # a hidden <input>: its label takes the click
                if box.is_checked() != (key in chosen):
                    item.click()
                expect(box).to_be_checked(checked=key in chosen)
            shot("partition_picker")
            page.keyboard.press("Escape")
            expect(dialog.get_by_text("2 partitions", exact=True)).to_be_visible()
            shot("materialize_dialog")
            dialog.get_by_role("button", name="Launch backfill").click()

            # 3. The toast links to the backfill's page.
            toast = page.get_by_text("Created backfill")
            expect(toast).to_be_visible()
            shot("backfill_created")
            page.get_by_role("link", name="View", exact=True).click()
            expect(page).to_have_url(re.compile(r"/runs/b/\w+"))
            status = page.get_by_text("Status", exact=True).locator("xpath=following-sibling::*[1]")
            expect(status).to_have_text(re.compile("In progress|Succeeded|Completed|Failed"))
            shot("backfill_page")
            expect(status).to_have_text(
                re.compile("Succeeded|Completed|Failed|Failing|Canceled|Canceling"), timeout=BACKFILL_TIMEOUT_MS
            )
            shot("backfill_finished")
            expect(status).to_have_text("Succeeded", timeout=1)
            print(f"backfill succeeded: {time.monotonic() - t0:.1f}s")

            # 4. curated_captions from the backfill's table: its row reads 2 targeted, 0 in progress,
            # 2 succeeded, 0 failed.
            link = page.locator('a[href="/assets/curated_captions"]')
            row = link.locator("xpath=ancestor::div[count(div)=5][1]")
            expect(row).to_have_text(re.compile(r"100% completed\s*2\s*0\s*2\s*0$"))
            link.click()
            expect(page).to_have_url(re.compile(r"/assets/curated_captions"))
            page.get_by_role("tab", name="Partitions").first.click()
            expect(page.get_by_text("Materialized (2)", exact=True)).to_be_visible()
            expect(page.get_by_text("Missing (1)", exact=True)).to_be_visible()
            shot("partitions")

            # 5. Each shard's counts, as the Parquet files have them.
            for i, key in enumerate(chosen):
                kept, rejected = parquet_counts(dagster_dev.storage_root, key)
                page.get_by_title(key, exact=True).click()
                expect(page).to_have_url(re.compile(rf"[?&]partition={re.escape(quote(key))}(&|$)"))
                expect(metadata_row(page, "kept")).to_have_text(re.compile(rf"^\s*kept\s*{kept}\s*$"))
                expect(metadata_row(page, "rejected")).to_have_text(re.compile(rf"^\s*rejected\s*{rejected}\s*$"))
                shot(f"shard{i + 1}_counts")
                print(f"{key}: kept {kept}, rejected {rejected} (Parquet) shown")

            # 6. The checks: each listed as succeeded, and in its history a passed evaluation per shard.
            page.get_by_role("tab", name="Checks").first.click()
            expect(page.get_by_text(f"Checks ({len(checks)})", exact=True)).to_be_visible()
            for name in checks:
                page.get_by_title(name, exact=True).first.click()
                expect(page).to_have_url(re.compile(rf"[?&]checkDetail={re.escape(quote(name))}(&|$)"))
                page.get_by_role("tab", name="Execution history").click()
                for key in chosen:
                    evaluation = page.get_by_role("row").filter(has=page.get_by_role("cell", name=key, exact=True))
                    expect(evaluation).to_have_count(1)
                    expect(evaluation).to_contain_text("Passed")
                expect(page.get_by_role("cell", name=left_out, exact=True)).to_have_count(0)
                shot(f"check_{name}")
            print(f"checks {', '.join(checks)} passed on both shards: {time.monotonic() - t0:.1f}s")
        except Exception:
            page.screenshot(path=artifacts / "failure.png", full_page=True)
            (artifacts / "failure.html").write_text(page.content())
            print(f"server log (tail):\n{dagster_dev.log_tail()}")
            raise
        finally:
            browser.close()

    # Only the two shards were run: the third has no curated table.
    assert not (dagster_dev.storage_root / "curated_captions" / left_out).exists()
    print(f"total: {time.monotonic() - t0:.1f}s")
