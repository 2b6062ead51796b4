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


# ---------------------------------------------------------------------------------------------
# Tool turns: the built-in calls an answer made, kept with it


def turn(expression="12*7", result="84", ok=True, **where):
    """A built-in calculator call as the server's `tool_results` sends it, with `at` / `round` when given."""
    return {"type": "function", "function": {"name": "calculator", "arguments": f'{{"expression": "{expression}"}}'},
            "content": result, "ok": ok, **where}


def test_an_answer_keeps_its_tool_turns_and_the_functions_the_model_was_shown(store):
    conv, (user,) = chat(store, turns=["What is 12*7 and 1/0?"])
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    content = "Let me see. It is 84; 1/0 fails."
    answer = store.add_message(conv["id"], "assistant", content, tool_turns=[
        turn(at=12), turn("1/0", "error: division by zero", ok=False, at=len(content) - 10)], tools=tools)
    assert answer["tool_turns"] == [turn(at=12, round=0),
                                    turn("1/0", "error: division by zero", ok=False, at=len(content) - 10, round=1)]
    assert answer["tools"] == [{"name": "calculator", "parameters": {"type": "object"}}]  # bare function objects
    shown = store.get_conversation(conv["id"])["messages"]
    assert shown[1]["tool_turns"] == answer["tool_turns"] and shown[0]["tool_turns"] == []
    assert shown[0]["tools"] is None
    store.rate(answer["id"], 1)
    (rated,) = store.rated_answers()
    assert rated["tool_turns"] == answer["tool_turns"] and rated["tools"] == answer["tools"]
    # the model saw the answer's text: the context of a later turn is plain text, as the page sends it
    assert store.context(answer["id"])[-1] == {"role": "assistant", "content": content}
    plain = store.add_message(conv["id"], "assistant", "84.", parent_id=user["id"])
    assert plain["tool_turns"] == [] and plain["tools"] is None


def test_tool_turns_default_to_before_the_text_and_rounds_follow_their_place(store):
    conv, (user,) = chat(store, turns=["q"])
    add = lambda turns: store.add_message(conv["id"], "assistant", "abcdef", parent_id=user["id"],  # noqa: E731
                                          tool_turns=turns)["tool_turns"]
    # no place given: before the text, one round; calls at one place are one round unless told otherwise
    assert [(t["at"], t["round"]) for t in add([turn(), turn()])] == [(0, 0), (0, 0)]
    assert [(t["at"], t["round"]) for t in add([turn(at=2), turn(at=2), turn(at=4)])] == [(2, 0), (2, 0), (4, 1)]
    assert [(t["at"], t["round"]) for t in add([turn(round=3), turn(round=4)])] == [(0, 0), (0, 1)]
    objects = add([{"function": {"name": "calendar", "arguments": {"operation": "today"}}, "content": "2024-05-01"}])
    assert objects[0]["function"]["arguments"] == '{"operation": "today"}' and objects[0]["ok"] is True
    assert add([]) == [] and add(None) == []


@pytest.mark.parametrize("turns, message", [
    ("calculator", "tool_turns must be a list"),
    (["84"], r"tool_turns\[0\]: expected an object"),
    ([{"content": "84"}], r"tool_turns\[0\].function: expected"),
    ([turn(result=None)], r"tool_turns\[0\].content: expected the tool's result as a string"),
    ([turn(ok="yes")], r"tool_turns\[0\].ok: expected true or false"),
    ([turn(at=7)], r"tool_turns\[0\].at: expected a character offset into the answer \(0 to 6\), got 7"),
    ([turn(at=-1)], r"tool_turns\[0\].at"),
    ([turn(at=4), turn(at=2)], r"tool_turns\[1\].at: 2 comes before the previous turn's 4"),
    ([turn(round=-1)], r"tool_turns\[0\].round"),
    ([turn()] * 65, "65 tool turns; expected at most 64"),
])
def test_tool_turns_are_checked_against_their_answer(store, turns, message):
    conv, (user,) = chat(store, turns=["q"])
    with pytest.raises(StoreError, match=message):
        store.add_message(conv["id"], "assistant", "abcdef", parent_id=user["id"], tool_turns=turns)


def test_only_answers_have_tool_turns_and_declared_tools_are_checked(store):
    conv, (user, answer) = chat(store)
    with pytest.raises(StoreError, match="only an answer"):
        store.add_message(conv["id"], "user", "again", parent_id=answer["id"], tool_turns=[turn()])
    with pytest.raises(StoreError, match="tools"):
        store.add_message(conv["id"], "assistant", "x", parent_id=user["id"], tools=[{"name": "bad name"}])


def test_a_comparison_keeps_each_answers_tool_turns_on_it_and_on_its_messages(store):
    conv, (user,) = chat(store, turns=["What is 12*7?"])
    tools = [{"name": "calculator"}]
    c = store.add_comparison("It is 84.", "About 80.", "a", conversation_id=conv["id"], parent_id=user["id"],
                             tool_turns_a=[turn()], tools=tools)
    assert c["tool_turns_a"] == [turn(at=0, round=0)] and c["tool_turns_b"] == [] and c["tools"] == tools
    assert store.list_comparisons()[0]["tool_turns_a"] == c["tool_turns_a"]
    a, b = store.get_message(c["message_a_id"]), store.get_message(c["message_b_id"])
    assert (a["tool_turns"], b["tool_turns"]) == (c["tool_turns_a"], [])
    assert a["tools"] == b["tools"] == tools  # one request's settings made both
    outside = store.add_comparison("A", "B", "b", prompt="p", tool_turns_b=[turn(at=1)])
    assert outside["tool_turns_b"] == [turn(at=1, round=0)] and outside["tools"] is None
    with pytest.raises(StoreError, match="tool_turns_b"):
        store.add_comparison("A", "B", "b", prompt="p", tool_turns_b=[turn(at=2)])  # past the end of "B"


# The tables as the first release of the store made them (SQLAlchemy's DDL for SQLite), before tool turns.
OLD_SCHEMA = """
CREATE TABLE conversations (id INTEGER NOT NULL, title VARCHAR(200) NOT NULL, system_prompt TEXT NOT NULL,
    settings JSON NOT NULL, active_leaf_id INTEGER, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
    PRIMARY KEY (id));
CREATE INDEX ix_conversations_updated_at ON conversations (updated_at);
CREATE TABLE messages (id INTEGER NOT NULL, conversation_id INTEGER NOT NULL, parent_id INTEGER,
    role VARCHAR(16) NOT NULL, content TEXT NOT NULL, system TEXT, params JSON, model VARCHAR(200),
    finish_reason VARCHAR(32), created_at DATETIME NOT NULL, PRIMARY KEY (id),
    FOREIGN KEY(conversation_id) REFERENCES conversations (id) ON DELETE CASCADE,
    FOREIGN KEY(parent_id) REFERENCES messages (id) ON DELETE CASCADE);
CREATE INDEX ix_messages_conversation_id ON messages (conversation_id);
CREATE INDEX ix_messages_parent_id ON messages (parent_id);
CREATE TABLE comparisons (id INTEGER NOT NULL, conversation_id INTEGER, prompt JSON NOT NULL,
    answer_a TEXT NOT NULL, answer_b TEXT NOT NULL, choice VARCHAR(8) NOT NULL, message_a_id INTEGER,
    message_b_id INTEGER, params JSON, model VARCHAR(200), created_at DATETIME NOT NULL, PRIMARY KEY (id),
    FOREIGN KEY(conversation_id) REFERENCES conversations (id) ON DELETE CASCADE,
    FOREIGN KEY(message_a_id) REFERENCES messages (id) ON DELETE SET NULL,
    FOREIGN KEY(message_b_id) REFERENCES messages (id) ON DELETE SET NULL);
CREATE INDEX ix_comparisons_conversation_id ON comparisons (conversation_id);
CREATE TABLE ratings (id INTEGER NOT NULL, message_id INTEGER NOT NULL, value INTEGER NOT NULL,
    created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, PRIMARY KEY (id), UNIQUE (message_id),
    FOREIGN KEY(message_id) REFERENCES messages (id) ON DELETE CASCADE);
INSERT INTO conversations VALUES (1, 'Capital?', '', '{}', 3, '2024-01-01 00:00:00', '2024-01-01 00:00:00');
INSERT INTO messages VALUES (1, 1, NULL, 'user', 'Capital?', NULL, NULL, NULL, NULL, '2024-01-01 00:00:00');
INSERT INTO messages VALUES (2, 1, 1, 'assistant', 'Kesh.', '', '{}', 'm', 'stop', '2024-01-01 00:00:00');
INSERT INTO messages VALUES (3, 1, 1, 'assistant', 'Mars.', '', '{}', 'm', 'stop', '2024-01-01 00:00:00');
INSERT INTO ratings VALUES (1, 2, 1, '2024-01-01 00:00:00', '2024-01-01 00:00:00');
INSERT INTO ratings VALUES (2, 3, -1, '2024-01-01 00:00:00', '2024-01-01 00:00:00');
INSERT INTO comparisons VALUES (1, NULL, '[{"role": "user", "content": "p"}]', 'A', 'B', 'a', NULL, NULL, NULL,
    NULL, '2024-01-01 00:00:00');
"""


def old_database(path):
    """A SQLite file as the store wrote it before answers kept tool turns, with a chat, thumbs and a comparison."""
    import sqlite3

    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    db.close()
    return path


def test_a_database_from_before_tool_turns_opens_and_gains_the_columns(tmp_path):
    import sqlite3

    path = old_database(tmp_path / "old.db")
    store = Store(path)
    messages = store.get_conversation(1)["messages"]
    assert [(m["content"], m["tool_turns"], m["tools"]) for m in messages] == [("Capital?", [], None),
                                                                            ("Mars.", [], None)]
    assert [a["rating"] for a in store.rated_answers()] == [1, -1]
    assert store.list_comparisons()[0]["tool_turns_a"] == []
    new = store.add_message(1, "assistant", "It is Kesh.", parent_id=1, tool_turns=[turn(at=3)])
    store.close()
    with sqlite3.connect(path) as db:  # the columns are in the file now, nullable; old rows hold NULL
        columns = {row[1]: row for row in db.execute("PRAGMA table_info(messages)")}
        assert columns["tool_turns"][3] == 0 and columns["tools"][3] == 0  # notnull = 0
        assert db.execute("SELECT tool_turns FROM messages WHERE id = 2").fetchone() == (None,)
    db.close()
    again = Store(path, create=False)  # a second open adds nothing and finds what was written
    assert again.get_message(new["id"])["tool_turns"] == [turn(at=3, round=0)]
    again.close()


def test_the_api_routes_carry_tool_turns_and_record_the_servers_built_in_tools():
    fastapi = pytest.importorskip("fastapi", reason="fastapi is not installed (the server's dependencies)")
    pytest.importorskip("httpx", reason="httpx is not installed (FastAPI's test client needs it)")
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from chatforge.serve.web import attach_web
    from chatforge.tools import builtin_tools

    app = fastapi.FastAPI()
    attach_web(app, "sqlite://")
    app.state.chatforge = SimpleNamespace(builtin_tools=builtin_tools())  # chatforge serve --builtin-tools
    specs = [t.spec() for t in builtin_tools().values()]
    with TestClient(app) as client:
        cid = client.post("/api/conversations", json={}).json()["id"]
        user = client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": "12*7?"}).json()
        assert user["tools"] is None  # a user turn was not made with tools
        url = f"/api/conversations/{cid}/messages"
        answer = client.post(url, json={"role": "assistant", "content": "It is 84.", "parent_id": user["id"],
                                        "tool_turns": [turn()]})
        assert answer.status_code == 201, answer.text
        assert answer.json()["tool_turns"] == [turn(at=0, round=0)]
        assert answer.json()["tools"] == specs  # left out: what this server declared to the model
        plain = client.post(url, json={"role": "assistant", "content": "84", "parent_id": user["id"]}).json()
        assert plain["tools"] == specs and plain["tool_turns"] == []  # shown the tools, did not call one
        told = client.post(url, json={"role": "assistant", "content": "84!", "parent_id": user["id"], "tools": None})
        assert told.json()["tools"] is None
        shown = client.get(f"/api/conversations/{cid}").json()["messages"]
        assert shown[-1]["id"] == told.json()["id"]
        client.post(f"/api/conversations/{cid}/branch", json={"message_id": answer.json()["id"]})
        assert client.get(f"/api/conversations/{cid}").json()["messages"][-1]["tool_turns"] == [turn(at=0, round=0)]
        comparison = client.post("/api/comparisons", json={
            "conversation_id": cid, "parent_id": user["id"], "answer_a": "84", "answer_b": "It is 84.",
            "choice": "b", "tool_turns_b": [turn(at=3)]}).json()
        assert (comparison["tool_turns_a"], comparison["tool_turns_b"]) == ([], [turn(at=3, round=0)])
        assert comparison["tools"] == specs
        assert client.get("/api/comparisons").json()[0]["tool_turns_b"] == comparison["tool_turns_b"]
        # a malformed turn is a 422 (its shape) or a 400 (its place in the answer)
        bad_shape = client.post(url, json={"role": "assistant", "content": "x", "parent_id": user["id"],
                                           "tool_turns": [{"content": "84"}]})
        assert bad_shape.status_code == 422
        bad_place = client.post(url, json={"role": "assistant", "content": "x", "parent_id": user["id"],
                                           "tool_turns": [turn(at=5)]})
        assert bad_place.status_code == 400 and "character offset" in bad_place.json()["detail"]
