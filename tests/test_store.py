"""The web chat's store (conversations as message trees, thumbs, comparisons) and its /api/ routes."""

from __future__ import annotations

import pytest

pytest.importorskip("sqlalchemy", reason="sqlalchemy is not installed (the server's dependencies)")

from chatforge.serve.store import NotFoundError, Store, StoreError, database_url  # noqa: E402


@pytest.fixture
def store():
    store = Store("sqlite://")  # in memory
    yield store
    store.close()


def chat(store, system="", turns=("hi", "hello")):
    """A conversation alternating user and assistant turns; returns (conversation, messages)."""
    conv = store.create_conversation(system_prompt=system)
    messages = [store.add_message(conv["id"], "user" if i % 2 == 0 else "assistant", text)
                for i, text in enumerate(turns)]
    return conv, messages


def test_a_conversation_keeps_its_turns_in_order_and_takes_its_title_from_the_first_message(store):
    conv, (user, answer, user2, answer2) = chat(store, "Be terse.", ["What is Kesh?\nTell me.", "A city.",
                                                                     "Where?", "Veloria."])
    got = store.get_conversation(conv["id"])
    assert got["title"] == "What is Kesh? Tell me." and got["system_prompt"] == "Be terse."
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("user", "What is Kesh?\nTell me."), ("assistant", "A city."), ("user", "Where?"), ("assistant", "Veloria.")]
    assert [m["parent_id"] for m in got["messages"]] == [None, user["id"], answer["id"], user2["id"]]
    assert answer2["system"] == "Be terse." and user["system"] is None  # answers record their system prompt
    assert store.context(answer2["id"]) == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is Kesh?\nTell me."},
        {"role": "assistant", "content": "A city."}, {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Veloria."}]
    long = store.create_conversation()
    store.add_message(long["id"], "user", "word " * 40)
    assert len(store.get_conversation(long["id"])["title"]) == 60
    assert store.get_conversation(long["id"])["title"].endswith("…")


def test_conversations_are_listed_most_recent_first_updated_and_deleted_with_everything_in_them(store):
    first, (_, answer) = chat(store, turns=["one", "uno"])
    second, _ = chat(store, turns=["two", "dos"])
    assert [c["title"] for c in store.list_conversations()] == ["two", "one"]
    store.add_message(first["id"], "user", "again")
    assert [c["title"] for c in store.list_conversations()] == ["one", "two"]
    assert [c["title"] for c in store.list_conversations(limit=1)] == ["one"]
    updated = store.update_conversation(first["id"], title="Renamed", system_prompt="S", settings={"top_p": 0.5})
    assert (updated["title"], updated["system_prompt"], updated["settings"]) == ("Renamed", "S", {"top_p": 0.5})
    store.rate(answer["id"], 1)
    store.add_comparison("a", "b", "a", conversation_id=first["id"], parent_id=store.get_conversation(
        first["id"])["messages"][-1]["id"])
    store.delete_conversation(first["id"])
    assert store.counts() == {"conversations": 1, "messages": 2, "ratings": 0, "comparisons": 0}
    with pytest.raises(NotFoundError, match="no conversation with id"):
        store.get_conversation(first["id"])


def test_regenerated_answers_are_siblings_and_the_shown_branch_can_be_switched(store):
    conv, (user, first) = chat(store, turns=["q", "answer one"])
    follow = store.add_message(conv["id"], "user", "follow-up")
    second = store.add_message(conv["id"], "assistant", "answer two", parent_id=user["id"])
    shown = store.get_conversation(conv["id"])["messages"]
    assert [m["content"] for m in shown] == ["q", "answer two"]
    assert shown[1]["siblings"] == [first["id"], second["id"]] and shown[0]["siblings"] == [user["id"]]
    # back to the first answer: its branch goes on to its newest descendant
    shown = store.select_branch(conv["id"], first["id"])["messages"]
    assert [m["content"] for m in shown] == ["q", "answer one", "follow-up"]
    assert shown[-1]["id"] == follow["id"]
    # a turn added without parent_id goes after the shown branch
    store.add_message(conv["id"], "assistant", "follow-up answer")
    assert [m["content"] for m in store.get_conversation(conv["id"])["messages"]][-2:] == [
        "follow-up", "follow-up answer"]
    with pytest.raises(NotFoundError):
        store.select_branch(conv["id"], 999)


def test_turns_must_alternate_and_stay_in_their_conversation(store):
    conv, (user, answer) = chat(store)
    other, (other_user, _) = chat(store)
    with pytest.raises(StoreError, match="a user turn must follow an assistant turn"):
        store.add_message(conv["id"], "user", "again", parent_id=user["id"])
    with pytest.raises(StoreError, match="an assistant turn must follow a user turn"):
        store.add_message(conv["id"], "assistant", "again", parent_id=answer["id"])
    with pytest.raises(StoreError, match="needs the user turn it answers"):
        store.add_message(conv["id"], "assistant", "again", parent_id=None)
    with pytest.raises(NotFoundError, match="not in conversation"):
        store.add_message(conv["id"], "assistant", "again", parent_id=other_user["id"])
    with pytest.raises(StoreError, match="unknown role 'system'"):
        store.add_message(conv["id"], "system", "You are a pirate.")
    with pytest.raises(StoreError, match="empty content"):
        store.add_message(conv["id"], "user", "  \n", parent_id=answer["id"])
    with pytest.raises(NotFoundError):
        store.add_message(12345, "user", "hi")
    root = store.add_message(conv["id"], "user", "a new first question", parent_id=None)  # a second root
    assert store.get_conversation(conv["id"])["messages"][0]["siblings"] == [user["id"], root["id"]]


def test_thumbs_are_set_changed_and_taken_back_on_answers_only(store):
    conv, (user, answer) = chat(store)
    assert store.rate(answer["id"], 1) == {"message_id": answer["id"], "rating": 1}
    assert store.get_message(answer["id"])["rating"] == 1
    store.rate(answer["id"], -1)
    assert store.get_conversation(conv["id"])["messages"][1]["rating"] == -1
    (rated,) = store.rated_answers()
    assert rated["prompt"] == [{"role": "user", "content": "hi"}] and rated["rating"] == -1
    store.rate(answer["id"], 0)
    assert store.rated_answers() == [] and store.get_message(answer["id"])["rating"] == 0
    with pytest.raises(StoreError, match="only answers are rated"):
        store.rate(user["id"], 1)
    with pytest.raises(StoreError, match="expected 1"):
        store.rate(answer["id"], 5)
    with pytest.raises(NotFoundError):
        store.rate(999, 1)


def test_a_rated_answer_keeps_the_system_prompt_it_was_made_with(store):
    conv, (_, answer) = chat(store, "Old system.")
    store.update_conversation(conv["id"], system_prompt="New system.")
    store.rate(answer["id"], 1)
    assert store.rated_answers()[0]["prompt"][0] == {"role": "system", "content": "Old system."}


def test_a_comparison_in_a_conversation_adds_both_answers_and_shows_the_preferred_one(store):
    conv, (user, answer) = chat(store, "Be brief.", ["q1", "a1"])
    user2 = store.add_message(conv["id"], "user", "q2")
    comparison = store.add_comparison("left", "right", "b", conversation_id=conv["id"], parent_id=user2["id"],
                                      params={"temperature": 0.7}, model="m")
    assert comparison["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                                    {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    shown = store.get_conversation(conv["id"])["messages"]
    assert shown[-1]["content"] == "right" and shown[-1]["id"] == comparison["message_b_id"]
    assert shown[-1]["siblings"] == [comparison["message_a_id"], comparison["message_b_id"]]
    tie = store.add_comparison("x", "y", "tie", conversation_id=conv["id"], parent_id=user2["id"])
    assert store.get_conversation(conv["id"])["messages"][-1]["id"] == tie["message_a_id"]
    assert [c["choice"] for c in store.list_comparisons()] == ["b", "tie"]


def test_a_comparison_outside_a_conversation_takes_a_checked_prompt(store):
    c = store.add_comparison("A", "B", "a", prompt="What is 2+2?")
    assert c["prompt"] == [{"role": "user", "content": "What is 2+2?"}] and c["conversation_id"] is None
    assert c["message_a_id"] is None
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    assert store.add_comparison("A", "B", "b", prompt=messages)["prompt"] == messages
    conv, (user, answer) = chat(store)
    with pytest.raises(StoreError, match="ends with an assistant turn"):
        store.add_comparison("A", "B", "a", prompt=[{"role": "user", "content": "u"},
                                                    {"role": "assistant", "content": "a"}])
    with pytest.raises(StoreError, match="choice 'c'"):
        store.add_comparison("A", "B", "c", prompt="p")
    with pytest.raises(StoreError, match="answer_b is empty"):
        store.add_comparison("A", " ", "a", prompt="p")
    with pytest.raises(StoreError, match="either parent_id"):
        store.add_comparison("A", "B", "a")
    with pytest.raises(StoreError, match="needs the conversation_id"):
        store.add_comparison("A", "B", "a", parent_id=user["id"])
    with pytest.raises(StoreError, match="expected the user turn"):
        store.add_comparison("A", "B", "a", conversation_id=conv["id"], parent_id=answer["id"])


def test_a_database_file_keeps_everything_across_opens_and_a_plain_path_is_a_sqlite_file(tmp_path):
    path = tmp_path / "sub" / "chats.db"  # the directory is made
    assert database_url(path) == f"sqlite:///{path}"
    first = Store(path)
    conv, _ = chat(first)
    first.close()
    again = Store(f"sqlite:///{path}")
    assert [m["content"] for m in again.get_conversation(conv["id"])["messages"]] == ["hi", "hello"]
    again.close()
    with pytest.raises(StoreError, match="cannot parse URL"):
        Store("not a url://x")
    with pytest.raises(StoreError, match="empty URL"):
        Store("")


# ---------------------------------------------------------------------------------------------
# The JSON routes


@pytest.fixture
def client():
    fastapi = pytest.importorskip("fastapi", reason="fastapi is not installed (the server's dependencies)")
    pytest.importorskip("httpx", reason="httpx is not installed (FastAPI's test client needs it)")
    from fastapi.testclient import TestClient

    from chatforge.serve.web import attach_web

    app = fastapi.FastAPI()
    attach_web(app, "sqlite://")
    with TestClient(app) as client:
        yield client


def test_the_api_routes_carry_a_whole_chat(client):
    conv = client.post("/api/conversations", json={"system_prompt": "Be terse.", "settings": {"top_p": 0.9}})
    assert conv.status_code == 201
    cid = conv.json()["id"]
    user = client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": "hi"}).json()
    a1 = client.post(f"/api/conversations/{cid}/messages",
                     json={"role": "assistant", "content": "one", "parent_id": user["id"], "finish_reason": "stop",
                           "params": {"temperature": 0.5}, "model": "m"}).json()
    a2 = client.post(f"/api/conversations/{cid}/messages",
                     json={"role": "assistant", "content": "two", "parent_id": user["id"]}).json()
    assert (a1["params"], a1["model"], a1["system"]) == ({"temperature": 0.5}, "m", "Be terse.")
    assert client.put(f"/api/messages/{a2['id']}/rating", json={"rating": -1}).json()["rating"] == -1
    got = client.get(f"/api/conversations/{cid}").json()
    assert [m["content"] for m in got["messages"]] == ["hi", "two"] and got["messages"][1]["rating"] == -1
    switched = client.post(f"/api/conversations/{cid}/branch", json={"message_id": a1["id"]}).json()
    assert [m["content"] for m in switched["messages"]] == ["hi", "one"]
    patched = client.patch(f"/api/conversations/{cid}", json={"title": "Greeting"}).json()
    assert patched["title"] == "Greeting" and patched["system_prompt"] == "Be terse."
    assert [c["title"] for c in client.get("/api/conversations").json()] == ["Greeting"]
    comparison = client.post("/api/comparisons", json={"conversation_id": cid, "parent_id": user["id"],
                                                       "answer_a": "A", "answer_b": "B", "choice": "a"})
    assert comparison.status_code == 201 and comparison.json()["prompt"][0]["role"] == "system"
    assert len(client.get("/api/comparisons").json()) == 1
    assert client.delete(f"/api/conversations/{cid}").status_code == 204
    assert client.get("/api/conversations").json() == []


def test_the_api_says_what_is_wrong(client):
    assert client.get("/api/conversations/7").status_code == 404
    cid = client.post("/api/conversations", json={}).json()["id"]
    bad_role = client.post(f"/api/conversations/{cid}/messages", json={"role": "system", "content": "x"})
    assert bad_role.status_code == 422
    first = client.post(f"/api/conversations/{cid}/messages", json={"role": "assistant", "content": "x"})
    assert first.status_code == 400 and "needs the user turn" in first.json()["detail"]
    user = client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": "hi"}).json()
    assert client.put(f"/api/messages/{user['id']}/rating", json={"rating": 1}).status_code == 400
    assert client.put(f"/api/messages/{user['id']}/rating", json={"rating": 2}).status_code == 422
    assert client.post("/api/comparisons", json={"answer_a": "a", "answer_b": "b", "choice": "a"}).status_code == 400
    assert client.post(f"/api/conversations/{cid}/messages",
                       json={"role": "user", "content": "x" * 200_001}).status_code == 422


def test_the_page_and_its_files_are_served_with_a_strict_content_security_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    # the page never turns data into markup
    assert "innerHTML" not in client.get("/static/app.js").text


def test_api_routes_want_the_servers_key_when_it_has_one():
    fastapi = pytest.importorskip("fastapi", reason="fastapi is not installed (the server's dependencies)")
    pytest.importorskip("httpx", reason="httpx is not installed (FastAPI's test client needs it)")
    from fastapi.testclient import TestClient

    from chatforge.serve.web import attach_web

    app = fastapi.FastAPI()
    attach_web(app, "sqlite://", api_key="sk-1")
    with TestClient(app) as client:
        assert client.get("/").status_code == 200  # the page holds no data: open
        assert client.get("/api/conversations").status_code == 401
        assert client.get("/api/conversations", headers={"Authorization": "Bearer sk-2"}).status_code == 401
        assert client.get("/api/conversations", headers={"Authorization": "Bearer sk-1"}).status_code == 200
    app = fastapi.FastAPI()
    app.state.api_key = "sk-state"  # the key the server keeps, read when a request comes
    attach_web(app, "")  # no database: kept in memory
    with TestClient(app) as client:
        assert client.get("/api/conversations").status_code == 401
        assert client.get("/api/conversations", headers={"Authorization": "Bearer sk-state"}).json() == []
