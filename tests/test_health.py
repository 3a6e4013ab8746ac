from starlette.testclient import TestClient


def test_healthz_answers_ok_without_a_token(client: TestClient) -> None:
    r = client.get("/healthz", headers={"Authorization": ""})
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
