from starlette.testclient import TestClient

from segactors.app import create_app


def test_healthz_answers_ok() -> None:
    with TestClient(create_app()) as client:
        r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
