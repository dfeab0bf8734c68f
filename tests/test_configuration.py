"""The documented settings, TLS verification and the metrics endpoint."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from conftest import REPO, drain, run_worker
from pgturso.common.settings import SETTINGS, markdown_table, server_markdown_table
from support.cloud_proxy import CloudProxy
from support.turso import TursoServer
from support.workers import WorkerProcess, outbox_empty, wait_until


def test_configuration_doc_lists_every_setting_as_the_code_defines_it():
    doc = (REPO / "docs/configuration.md").read_text()
    assert markdown_table() in doc, "regenerate the table: python -m pgturso.common.settings"
    assert server_markdown_table() in doc, "regenerate the tables: python -m pgturso.common.settings"


def test_help_lists_every_setting_with_its_environment_variable():
    out = subprocess.run([sys.executable, "-m", "pgturso", "run", "--help"], capture_output=True, text=True).stdout
    for setting in SETTINGS:
        assert setting.flag in out and setting.env in out


def _self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert, key


def test_tls_is_verified_by_default_and_a_private_ca_can_be_named(conn, dsn, turso: TursoServer, tmp_path):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    cert, key = _self_signed(tmp_path)
    with CloudProxy(turso.url, "tok", tls=(cert, key)) as cloud:
        url = cloud.url.replace("http://", "https://")
        refused = run_worker(dsn, url, "--auth-token", "tok", "--retry-limit", "1")
        assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
        assert "--tls-ca-file" in refused.stderr
        drain(dsn, url, "--auth-token", "tok", "--tls-ca-file", str(cert))
    assert turso.query("SELECT count(*) FROM sqlite_schema WHERE name = 't'") == [[1]]


def test_metrics_endpoint_reports_deliveries(conn, dsn, turso: TursoServer):
    from support.pgcluster import free_port

    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t SELECT generate_series(1, 25)")
    port = free_port()
    worker = WorkerProcess(dsn, turso.url, "--metrics-port", str(port), "--idle-wait", "1").start()
    try:
        wait_until(lambda: outbox_empty(dsn), 30, "delivery")

        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if not ln.startswith("#")}

        # The copy may read rows that capture also sent: idempotent upserts, counted each time. The backlog gauge
        # is refreshed by the pass after the delivery (the one that finds nothing), so a scrape between the two
        # passes shows the rows delivered and the old backlog: wait for one scrape that shows both done.
        scraped: list[dict[str, float]] = []
        wait_until(lambda: scraped.append(scrape()) or (scraped[-1].get("pgturso_rows_delivered_total", 0) >= 25
                                                         and scraped[-1].get("pgturso_backlog_events") == 0),
                   60, "the counters and the backlog gauge")
        values = scraped[-1]
        assert values["pgturso_up"] == 1 and values["pgturso_batches_total"] >= 1
        assert values["pgturso_retries_total"] == 0
        assert values["pgturso_transaction_hold_seconds"] > 0 and values["pgturso_batch_rows_limit"] == 50_000
    finally:
        assert worker.stop() == 0
