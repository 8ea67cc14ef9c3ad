"""The Dagster UI in a real headless Chromium: the asset graph, the movies partitions, and a run
launched through the webserver that completes.

`vcn ui` (webserver and daemon) serves a fresh project folder on 127.0.0.1 with the
Hamilton clip registered as a movie partition. The browser (Debian's chromium and
chromium-driver, which `.ci/run` installs) loads the asset pages, whose content the
UI renders with JavaScript; a run of `process_movie` for the partition is launched
through the webserver's GraphQL endpoint, queued, started by the daemon, and must
succeed and leave the movie's clusters in the warehouse.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import HAMILTON

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MOVIE = "hamilton-ui"
#: Movies of the backfill test (the same clip under three ids).
BACKFILL = ("bf-one", "bf-two", "bf-three")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(base URL, project folder) of a running `vcn ui` with one movie partition registered."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    home = tmp_path_factory.mktemp("vcn_ui_home")
    env = dict(os.environ, VCN_HOME=str(home), DAGSTER_HOME=str(home / "dagster"))
    # Register the movie as `vcn process` would, without processing it.
    subprocess.run(
        [sys.executable, "-c", _REGISTER, str(HAMILTON), MOVIE, *BACKFILL], env=env, check=True, capture_output=True,
        timeout=120,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(home / "ui.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vcn_assets.cli", "ui", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if _graphql(url, "{ version }").get("version"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the webserver did not answer within 180 s: {(home / 'ui.log').read_text()[-2000:]}")
            time.sleep(1)
        yield url, home
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


_REGISTER = """
import sys
import dagster as dg
from resources import MovieRegistry
from vcn_assets.definitions import build_resources
from vcn_assets.settings import Settings
settings = Settings.from_env().prepare()
registry = MovieRegistry(build_resources(settings)["store"])
for movie in sys.argv[2:]:
    registry.register(movie, sys.argv[1])
with dg.DagsterInstance.get() as instance:
    instance.add_dynamic_partitions("movies", sys.argv[2:])
"""


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    if answer.get("errors"):
        raise AssertionError(answer["errors"])
    return answer["data"]


@pytest.fixture(scope="module")
def browser(ui):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={ui[1] / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _wait_for_text(driver, texts: list[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{texts} not all on {driver.current_url} after {timeout} s; page shows: {body[:1500]}")
        time.sleep(1)


def test_asset_graph_shows_every_asset(ui, browser):
    url, home = ui
    browser.get(f"{url}/asset-groups")
    _wait_for_text(browser, ["preprocess", "models", "clusters"])
    browser.get(f"{url}/assets")
    body = _wait_for_text(browser, ["face_clusters", "finetuned_model", "track_crops"])
    for key in ("shots", "frames", "face_detections", "face_tracks", "base_model", "track_embeddings"):
        assert key in body, key
    browser.save_screenshot(str(home / "assets.png"))
    assert (home / "assets.png").stat().st_size > 10_000


def test_movies_partitions_are_listed(ui, browser):
    url, _ = ui
    browser.get(f"{url}/assets/face_clusters?view=partitions")
    _wait_for_text(browser, [MOVIE])


def test_a_run_launched_through_the_webserver_completes(ui, browser):
    url, home = ui
    launched = _graphql(
        url,
        """
        mutation Launch($params: ExecutionParams!) {
          launchRun(executionParams: $params) {
            __typename
            ... on LaunchRunSuccess { run { runId } }
            ... on PythonError { message }
            ... on RunConfigValidationInvalid { errors { message } }
          }
        }
        """,
        {
            "params": {
                "selector": {"repositoryLocationName": "vcn", "repositoryName": "__repository__", "jobName": "process_movie"},
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": MOVIE}]},
            }
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline, status = time.monotonic() + 420, None
    while time.monotonic() < deadline:
        status = _graphql(url, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", {"id": run_id})[
            "runOrError"
        ]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert status == "SUCCESS", f"run {run_id} ended {status}: {(home / 'ui.log').read_text()[-3000:]}"
    # The run page in the browser says so too.
    browser.get(f"{url}/runs/{run_id}")
    _wait_for_text(browser, ["Success"], timeout=60)

    from vcn.stores.warehouse import Warehouse

    wh = Warehouse(str(home / "warehouse.duckdb"))
    assert wh.query("SELECT count(*) FROM face_clusters WHERE movie_id = $1", [MOVIE]).item() > 0
    shutil.rmtree(home / "chromium-profile", ignore_errors=True)


def test_backfill_of_three_movies_runs_without_warehouse_lock_errors(ui):
    """A backfill over three partitions, launched through the webserver: the daemon runs them two at a
    time (the run queue's limit), all sharing one DuckDB warehouse."""
    url, home = ui
    launched = _graphql(
        url,
        """
        mutation Backfill($params: LaunchBackfillParams!) {
          launchPartitionBackfill(backfillParams: $params) {
            __typename
            ... on LaunchBackfillSuccess { backfillId }
            ... on PythonError { message }
          }
        }
        """,
        {
            "params": {
                "selector": {
                    "partitionSetName": "process_movie_partition_set",
                    "repositorySelector": {"repositoryLocationName": "vcn", "repositoryName": "__repository__"},
                },
                "partitionNames": list(BACKFILL),
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill = launched["backfillId"]
    runs_query = """
        query($tags: [ExecutionTag!]) {
          runsOrError(filter: {tags: $tags}) { ... on Runs { results { runId status tags { key value } } } }
        }
    """
    deadline, runs = time.monotonic() + 900, []
    while time.monotonic() < deadline:
        runs = _graphql(url, runs_query, {"tags": [{"key": "dagster/backfill", "value": backfill}]})["runsOrError"]["results"]
        if len(runs) == len(BACKFILL) and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
            break
        time.sleep(3)
    statuses = {next(t["value"] for t in r["tags"] if t["key"] == "dagster/partition"): r["status"] for r in runs}
    assert statuses == dict.fromkeys(BACKFILL, "SUCCESS"), f"{statuses}: {(home / 'ui.log').read_text()[-3000:]}"

    from vcn.stores.warehouse import Warehouse

    wh = Warehouse(str(home / "warehouse.duckdb"))
    movies = wh.query("SELECT DISTINCT movie_id FROM face_clusters ORDER BY 1")["movie_id"].to_list()
    assert set(BACKFILL) <= set(movies)
    log = (home / "ui.log").read_text().lower()
    assert "warehousebusyerror" not in log and "could not set lock" not in log
