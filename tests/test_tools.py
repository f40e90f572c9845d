"""Tests of the tool world: every tool, schemas, the protocol, the checker, Episode, rewards, BFCL replay."""
import copy
import json
import os
import random
import sys
import time
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tools  # noqa: E402

# ----------------------------------------------------------------------------------------------
# fixed configs, one per env

CONFIGS = {
    "files": {"files": {"/home/a.txt": "b\na x\nc", "/home/docs/r.txt": "report"}, "dirs": ["/tmp"], "cwd": "/home"},
    "messages": {"contacts": {"c1": {"name": "Ann Lee", "email": "ann@example.com", "phone": "1"}},
                 "inbox": {"m1": {"from": "ann@example.com", "subject": "Budget", "body": "numbers", "read": False}}},
    "calendar": {"events": {"e1": {"title": "Standup", "date": "2025-03-03", "start": "09:00", "end": "09:30",
                                   "attendees": []}}},
    "bank": {"accounts": {"chk": {"name": "checking", "balance": 100.0}, "sav": {"name": "savings", "balance": 1000.0}},
             "prices": {"ACME": 10.0}, "holdings": {"ACME": 2}, "payees": ["City Power"]},
    "travel": {"budget": 500.0, "airports": {"San Francisco": "SFO", "New York": "JFK"}, "seed": 3,
               "flights": {"FL1": {"origin": "SFO", "destination": "JFK", "date": "2025-05-01", "price": 300.0, "seats": 1},
                           "FL2": {"origin": "SFO", "destination": "JFK", "date": "2025-05-01", "price": 900.0, "seats": 5}},
               "hotels": {"H1": {"city": "New York", "name": "Inn", "price": 100.0, "rooms": 1}}},
    "home": {**tools.default_config("home", random.Random(0)), "pin": "1234"},
    "math": {},
}
BUY = {"name": "place_order", "arguments": {"account_id": "chk", "symbol": "ACME", "side": "buy", "shares": 2, "price": 10.0}}
FLY = {"name": "book_flight", "arguments": {"flight_id": "FL1", "passenger": "Ann Lee"}}
SCENE = {"name": "create_scene", "arguments": {"name": "night", "device_ids": ["d1", "k1"]}}
booking = lambda r: {"booking_id": r["booking_id"]}  # noqa: E731  (args from the setup call's result)

# name -> (happy args, error args or None, setup call or None). None error args: the error path is a
# validation error (an unexpected argument), since the tool itself cannot fail.
CASES = {
    "pwd": ({}, None, None), "ls": ({"path": "docs"}, {"path": "nope"}, None),
    "cd": ({"path": "docs"}, {"path": "nope"}, None), "mkdir": ({"path": "new"}, {"path": "x/y"}, None),
    "touch": ({"path": "t.txt"}, {"path": "/nope/t.txt"}, None),
    "write": ({"path": "a.txt", "content": "z", "append": True}, {"path": "/home/docs", "content": "z"}, None),
    "cat": ({"path": "a.txt"}, {"path": "zz"}, None), "head": ({"path": "a.txt", "lines": 1}, {"path": "a.txt", "lines": 0}, None),
    "mv": ({"source": "a.txt", "destination": "docs"}, {"source": "zz", "destination": "docs"}, None),
    "cp": ({"source": "a.txt", "destination": "/tmp/b.txt"}, {"source": "a.txt", "destination": "docs/r.txt"}, None),
    "rm": ({"path": "a.txt"}, {"path": "docs"}, None), "find": ({"name": "r"}, {"name": "r", "path": "nope"}, None),
    "grep": ({"pattern": "a", "path": "a.txt"}, {"pattern": "a", "path": "zz"}, None),
    "wc": ({"path": "a.txt"}, {"path": "zz"}, None), "sort": ({"path": "a.txt"}, {"path": "zz"}, None),
    "search_contacts": ({"query": "ann"}, None, None), "get_contact": ({"contact_id": "c1"}, {"contact_id": "c9"}, None),
    "add_contact": ({"name": "Bo", "email": "bo@x.com"}, {"name": "Bo", "email": "ann@example.com"}, None),
    "update_contact": ({"contact_id": "c1", "field": "phone", "value": "2"}, {"contact_id": "c9", "field": "phone", "value": "2"}, None),
    "delete_contact": ({"contact_id": "c1"}, {"contact_id": "c9"}, None),
    "send_message": ({"to": "ann@example.com", "subject": "s", "body": "b"}, {"to": "x@y.com", "subject": "s", "body": "b"}, None),
    "list_inbox": ({"unread_only": True}, None, None), "read_message": ({"message_id": "m1"}, {"message_id": "m9"}, None),
    "reply": ({"message_id": "m1", "body": "ok"}, {"message_id": "m9", "body": "ok"}, None),
    "delete_message": ({"message_id": "m1"}, {"message_id": "m9"}, None), "search_messages": ({"query": "numb"}, None, None),
    "list_events": ({"date": "2025-03-03"}, {"date": "03/03/2025"}, None), "get_event": ({"event_id": "e1"}, {"event_id": "e9"}, None),
    "search_events": ({"query": "stand"}, None, None),
    "create_event": ({"title": "x", "date": "2025-03-03", "start": "10:00", "end": "11:00", "attendees": ["a@b.c"]},
                     {"title": "x", "date": "2025-03-03", "start": "09:15", "end": "10:00"}, None),
    "move_event": ({"event_id": "e1", "date": "2025-03-04", "start": "10:00"}, {"event_id": "e1", "date": "2025-03-04", "start": "23:50"}, None),
    "cancel_event": ({"event_id": "e1"}, {"event_id": "e9"}, None),
    "add_attendee": ({"event_id": "e1", "email": "a@b.c"}, {"event_id": "e1", "email": "nope"}, None),
    "find_free_slot": ({"date": "2025-03-03", "duration_minutes": 30},
                       {"date": "2025-03-03", "duration_minutes": 90, "earliest": "09:00", "latest": "10:00"}, None),
    "list_accounts": ({}, None, None), "get_balance": ({"account_id": "chk"}, {"account_id": "zzz"}, None),
    "transfer": ({"from_account": "sav", "to_account": "chk", "amount": 50}, {"from_account": "sav", "to_account": "chk", "amount": 5000}, None),
    "pay_bill": ({"account_id": "chk", "payee": "City Power", "amount": 10.5}, {"account_id": "chk", "payee": "Nobody", "amount": 1}, None),
    "list_transactions": ({"account_id": "sav"}, {"account_id": "chk", "limit": 0}, BUY),
    "get_quote": ({"symbol": "ACME"}, {"symbol": "ZZZ"}, None),
    "place_order": (BUY["arguments"], {**BUY["arguments"], "price": 9.0}, None),
    "get_order": ({"order_id": "o101"}, {"order_id": "o999"}, BUY), "cancel_order": ({"order_id": "o101"}, {"order_id": "o999"}, BUY),
    "list_holdings": ({}, None, None), "airport_code": ({"city": "san francisco"}, {"city": "Paris"}, None),
    "search_flights": ({"origin": "SFO", "destination": "JFK", "date": "2025-05-01"}, {"origin": "SFO", "destination": "JFK", "date": "May 1"}, None),
    "get_flight": ({"flight_id": "FL1"}, {"flight_id": "FL9"}, None),
    "book_flight": (FLY["arguments"], {"flight_id": "FL2", "passenger": "Ann Lee"}, None),
    "search_hotels": ({"city": "new york", "max_price": 150}, None, None),
    "book_hotel": ({"hotel_id": "H1", "guest": "Ann", "nights": 2}, {"hotel_id": "H1", "guest": "Ann", "nights": 0}, None),
    "cancel_booking": (booking, {"booking_id": "BK0"}, FLY), "get_booking": (booking, {"booking_id": "BK0"}, FLY),
    "list_bookings": ({}, None, None), "set_budget": ({"amount": 100}, {"amount": -1}, None),
    "list_devices": ({"room": "kitchen"}, None, None), "get_device": ({"device_id": "d1"}, {"device_id": "zz"}, None),
    "turn_on": ({"device_id": "d1"}, {"device_id": "k1"}, None), "turn_off": ({"device_id": "d2"}, {"device_id": "k1"}, None),
    "set_brightness": ({"device_id": "d1", "level": 50}, {"device_id": "d1", "level": 0}, None),
    "set_temperature": ({"device_id": "t1", "celsius": 21.5}, {"device_id": "d1", "celsius": 21}, None),
    "lock": ({"device_id": "k1"}, {"device_id": "d1"}, {"name": "unlock", "arguments": {"device_id": "k1", "pin": "1234"}}),
    "unlock": ({"device_id": "k1", "pin": "1234"}, {"device_id": "k1", "pin": "0000"}, None),
    "create_scene": (SCENE["arguments"], {"name": "night", "device_ids": ["zz"]}, None),
    "activate_scene": ({"name": "night"}, {"name": "party"}, SCENE),
    "add": ({"a": 1, "b": 2.5}, None, None), "subtract": ({"a": 1, "b": 2}, None, None),
    "multiply": ({"a": 3, "b": 2}, {"a": 1e308, "b": 10}, None), "divide": ({"a": 1, "b": 4}, {"a": 1, "b": 0}, None),
    "power": ({"base": 2, "exponent": 10}, {"base": -8, "exponent": 0.5}, None), "sqrt": ({"x": 9}, {"x": -1}, None),
    "mean": ({"numbers": [1, 2, 3.5]}, {"numbers": []}, None), "round_number": ({"x": 2.345, "digits": 1}, {"x": 1, "digits": 11}, None),
    "percentage": ({"part": 1, "whole": 4}, {"part": 1, "whole": 0}, None),
    "convert_units": ({"value": 10, "from_unit": "km", "to_unit": "mile"}, {"value": 1, "from_unit": "km", "to_unit": "kg"}, None),
    "add_days": ({"date": "2025-02-27", "days": 2}, {"date": "2025-02-30", "days": 1}, None),
    "days_between": ({"start": "2025-03-01", "end": "2025-02-27"}, {"start": "x", "end": "2025-02-27"}, None),
}


def fresh(name):
    return tools.ENVS[name](copy.deepcopy(CONFIGS[name]))


def test_counts_and_unique_names():
    assert len(tools.ENVS) >= 6 and len(tools.SCHEMAS) >= 60
    assert set(CASES) == set(tools.SCHEMAS)  # the table covers every tool
    assert 0 < len(tools.READ_ONLY) < len(tools.SCHEMAS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tool_happy_and_error_path(name):
    happy, bad, setup = CASES[name]
    env_name = tools.OWNER[name]
    known = {n: tools.SCHEMAS[n] for n in tools.SCHEMAS}
    for args, want_error in ((happy, False), (bad, True)):
        env = fresh(env_name)
        pre = env._call(setup["name"], setup["arguments"]) if setup else None
        if callable(args):
            args = args(pre)
        if args is None:  # validation error path
            happy_args = happy(pre) if callable(happy) else happy
            assert "unexpected argument" in tools.validate_call({"name": name, "arguments": {**happy_args, "zz": 1}}, known)
            continue
        assert tools.validate_call({"name": name, "arguments": args}, known) is None
        before = copy.deepcopy(env._state())
        out = env._call(name, args)
        json.dumps(out)  # results are plain JSON
        assert ("error" in out) == want_error, out
        if want_error:
            assert isinstance(out["error"], str) and out["error"] and "internal error" not in out["error"]
        if tools.is_read_only(name) or want_error:
            assert env._state() == before  # read-only tools and failures leave the state alone
        else:
            assert env._state() != before or name in ("cd", "touch", "activate_scene")  # idempotent here


def test_some_values():
    f, m, b = fresh("files"), fresh("math"), fresh("bank")
    assert f.ls()["entries"] == ["a.txt", "docs/"]
    assert f.mv("docs", "/tmp")["destination"] == "/tmp/docs" and "/tmp/docs/r.txt" in f.files
    assert m.add_days("2024-02-28", 2) == {"date": "2024-03-01"} and m.convert_units(212, "F", "C") == {"result": 100.0}
    assert b.place_order(**BUY["arguments"]) == {"order_id": "o101", "status": "filled", "total": 20.0}
    assert b.accounts["chk"]["balance"] == 80.0 and b.holdings["ACME"] == 4
    assert b.cancel_order("o101")["status"] == "cancelled" and b.accounts["chk"]["balance"] == 100.0


def test_dependent_calls_chain():
    # the output of one call is the argument of the next, in every domain that has ids
    t = fresh("travel")
    code = t.airport_code("New York")["code"]
    fid = t.search_flights("SFO", code, "2025-05-01")["flights"][0]["id"]
    bid = t.book_flight(fid, "Ann Lee")["booking_id"]
    assert t.budget == 200.0 and t.book_flight(fid, "Bo")["error"].startswith("unknown or sold-out")
    assert t.cancel_booking(bid) == {"cancelled": bid, "refund": 300.0, "budget_left": 500.0}
    msg = fresh("messages")
    email = msg.search_contacts("lee")["contacts"][0]["email"]
    assert "message_id" in msg.send_message(email, "hi", "there")
    b = fresh("bank")
    price = b.get_quote("ACME")["price"]
    assert b.place_order("chk", "ACME", "sell", 1, price)["total"] == 10.0
    f = fresh("files")
    path = f.find("r.txt", "/")["matches"][0]
    assert f.cat(path)["content"] == "report"


def test_determinism_and_seed():
    def run(seed):
        t = tools.Travel({**CONFIGS["travel"], "seed": seed, "budget": 5000.0})
        return [t.book_flight("FL2", "A"), t.book_hotel("H1", "A", 1), t._state()]
    assert run(1) == run(1) and run(1)[0] != run(2)[0]
    for name in tools.ENVS:  # sample configs are seeded too
        assert tools.default_config(name, random.Random(5)) == tools.default_config(name, random.Random(5))
        tools.ENVS[name](tools.default_config(name, random.Random(5)))


def test_schema_generation():
    s = tools.SCHEMAS["place_order"]["function"]
    assert s["parameters"]["required"] == ["account_id", "symbol", "side", "shares", "price"]
    p = s["parameters"]["properties"]
    assert p["side"] == {"type": "string", "enum": ["buy", "sell"], "description": "'buy' or 'sell'."}
    assert p["shares"]["type"] == "integer" and p["price"]["type"] == "number" and "get_quote" in p["price"]["description"]
    assert "Fails on" in s["description"]
    ce = tools.SCHEMAS["create_event"]["function"]["parameters"]
    assert ce["properties"]["attendees"]["type"] == "array" and ce["properties"]["attendees"]["items"] == {"type": "string"}
    assert "attendees" not in ce["required"]
    assert tools.SCHEMAS["head"]["function"]["parameters"]["properties"]["lines"]["default"] == 5
    for sch in tools.SCHEMAS.values():
        json.dumps(sch)
        assert sch["function"]["description"] and all(v["description"] for v in sch["function"]["parameters"]["properties"].values())
    names = [x["function"]["name"] for x in tools.tool_schemas(["bank", "math"], exclude=("add",))]
    assert "place_order" in names and "sqrt" in names and "add" not in names and "ls" not in names
    text = tools.tools_text(tools.tool_schemas(["math"]))
    assert text.startswith("<tools>\n") and text.endswith("\n</tools>") and len(text.split("\n")) == 12 + 2


# ----------------------------------------------------------------------------------------------
# protocol

ROUND_TRIPS = [
    ("did x", "do y", [{"name": "ls", "arguments": {}}], ""),
    (None, None, [{"name": "cat", "arguments": {"path": "a \"quoted\" </tool_call> ünïcode 名前"}},
                  {"name": "mean", "arguments": {"numbers": [1, 2.5, -3]}}], ""),
    ("Known: BK1, 320.0", None, [], "Your booking is BK1."),
    (None, None, [], "plain answer"),
    ("s", "p", [{"name": "create_event", "arguments": {"title": "a\nb", "date": "2025-03-03", "start": "09:00",
                                                       "end": "10:00", "attendees": []}}], "some text"),
]


@pytest.mark.parametrize("summary,plan,calls,content", ROUND_TRIPS)
def test_message_round_trip(summary, plan, calls, content):
    p = tools.parse_message(tools.render_message(summary, plan, calls, content))
    assert (p.summary, p.plan, p.calls, p.content, p.errors) == (summary, plan, calls, content, [])
    py_calls, errors = tools.parse_python_calls(tools.render_python_calls(calls))
    assert py_calls == calls and errors == []


@pytest.mark.parametrize("text,error", [
    ("<tool_call>{\"name\": \"ls\", \"arguments\": {}</tool_call>", "tool_call: invalid JSON"),
    ("<tool_call>{\"name\": \"ls\"", "tool_call: unclosed or stray <tool_call>"),
    ("<tool_call>[1, 2]</tool_call>", 'tool_call: expected {"name"'),
    ("<tool_call>{\"name\": \"ls\", \"arguments\": [1]}</tool_call>", "tool_call ls: arguments must be a JSON object"),
    ("<tool_call>{\"name\": \"sqrt\", \"arguments\": {\"x\": NaN}}</tool_call>", "tool_call: invalid JSON (NaN"),
    ("<summary>a</summary><summary>b</summary>", "more than one <summary>"),
    ("<plan>never closed", "unclosed or stray <plan> tag"),
    ("<summary>Done: rm<summary>blue</summary>\nDeleted.", "<summary> tag inside <summary>"),  # an RL sample
    ("<summary>s</summary><plan>Next: <tool_call>{\"name\": \"pwd\", \"arguments\": {}}</tool_call></plan>",
     "<tool_call> tag inside <plan>"),
])
def test_parse_errors(text, error):
    p = tools.parse_message(text)
    assert any(e.startswith(error) for e in p.errors), p.errors
    assert not p.calls


def test_parse_lenient_and_not_text():
    p = tools.parse_message('<tool_call>{"name": "sqrt", "arguments": "{\\"x\\": 4}"}</tool_call>')
    assert p.calls == [{"name": "sqrt", "arguments": {"x": 4}}] and not p.errors  # double-encoded arguments
    assert tools.parse_message('<tool_call>{"name": "pwd"}</tool_call>').calls == [{"name": "pwd", "arguments": {}}]
    assert tools.parse_message(None).errors == ["message is not text"]


@pytest.mark.parametrize("text,pa,ok", [
    ("<summary>s</summary>\n<plan>p</plan>\n<tool_call>{\"name\": \"pwd\", \"arguments\": {}}</tool_call>", True, True),
    ("<summary>s</summary>\nAll done.", True, True),
    ("<plan>p</plan><summary>s</summary><tool_call>{\"name\": \"pwd\", \"arguments\": {}}</tool_call>", True, False),
    ("<summary>s</summary><tool_call>{\"name\": \"pwd\", \"arguments\": {}}</tool_call>", True, False),
    ("All done.", True, False),
    ("<summary>s</summary>", True, False),
    ("<tool_call>{\"name\": \"pwd\", \"arguments\": {}}</tool_call>", False, True),
    ("All done.", False, True),
    ("<summary>s</summary>All done.", False, False),
    ("<tool_call>{\"name\": \"pwd\", \"arguments\": {}}</tool_call> trailing chat", False, False),
    ("", False, False),
])
def test_format_ok(text, pa, ok):
    assert tools.format_ok(tools.parse_message(text), pa) == ok


def test_python_calls():
    sigs = {"cd": ["folder"]}
    assert tools.parse_python_calls("[cd('docs')]", sigs) == ([{"name": "cd", "arguments": {"folder": "docs"}}], [])
    assert tools.parse_python_calls("cd(folder='a')") == ([{"name": "cd", "arguments": {"folder": "a"}}], [])
    for bad in ["[cd('docs')]", "[cd(folder=x)]", "[cd(folder=f(1))]", "[os.system('x')]", "[1]", "[cd(",
                "[cd(**{'a': 1})]", "[f(a={1, 2})]", "[f(a=float('nan'))]", "[" * 10000]:
        calls, errors = tools.parse_python_calls(bad)
        assert errors and not calls, bad
    assert tools.render_python_calls([{"name": "f", "arguments": {"a": "it's", "b": [True, None]}}]) == \
        "[f(a=\"it's\", b=[True, None])]"


def test_validate_call():
    known = tools.SCHEMAS
    v = lambda name, args, **kw: tools.validate_call({"name": name, "arguments": args}, known, **kw)  # noqa: E731
    assert v("nope", {}) == "unknown function 'nope'"
    assert v("sqrt", {"x": 1}, offered={"ls"}) == "function 'sqrt' is not available"
    assert "missing required argument(s) ['x']" in v("sqrt", {})
    assert "unexpected argument(s) ['y']" in v("sqrt", {"x": 1, "y": 2})
    assert v("sqrt", {"x": 1}) is None and v("sqrt", {"x": 1.5}) is None  # int is accepted for number
    assert "must be number, got string" in v("sqrt", {"x": "1"})
    assert "must be number, got boolean" in v("sqrt", {"x": True})
    assert "must be integer, got number" in v("head", {"path": "a", "lines": 1.5})
    assert "must be boolean, got integer" in v("list_inbox", {"unread_only": 1})
    assert "'numbers'[1] must be number, got string" in v("mean", {"numbers": [1, "2"]})
    assert "must be array, got object" in v("mean", {"numbers": {}})
    assert "must be one of ['buy', 'sell']" in v("place_order", {**BUY["arguments"], "side": "hold"})
    assert "must be string, got null" in v("cat", {"path": None})
    assert "arguments too long" in v("cat", {"path": "x" * 30000})
    assert v("mean", {"numbers": ["x"]}, check_types=False) is None


def test_tool_message_cap():
    small = tools.tool_message("cat", result={"content": "hi"})
    assert small == {"role": "tool", "content": '{"name":"cat","result":{"content":"hi"}}'}
    big = tools.tool_message("cat", result={"content": "x" * 10000}, max_tool_chars=500)
    body = json.loads(big["content"])
    assert len(big["content"]) <= 500 and body["error"].startswith("output too long") and body["partial"]
    assert json.loads(tools.tool_message("cat", error="no such file: a")["content"])["error"] == "no such file: a"


# ----------------------------------------------------------------------------------------------
# a hand-made multi-turn task on our envs

def travel_task(types=("normal", "normal")):
    bid = tools.Travel(copy.deepcopy(CONFIGS["travel"])).book_flight("FL1", "Ann Lee")["booking_id"]
    c = lambda name, **a: {"name": name, "arguments": a}  # noqa: E731
    return {"id": "t1", "envs": {"travel": CONFIGS["travel"], "messages": CONFIGS["messages"]}, "held_out": [],
            "split": "test", "tags": {},
            "turns": [{"user": "Book the cheapest SFO->JFK flight on 2025-05-01 for Ann Lee.", "type": types[0],
                       "gt": [[c("search_flights", origin="SFO", destination="JFK", date="2025-05-01")],
                              [c("book_flight", flight_id="FL1", passenger="Ann Lee")]], "add_functions": []},
                      {"user": "Email Ann the booking id.", "type": types[1],
                       "gt": [[c("search_contacts", query="Ann")],
                              [c("send_message", to="ann@example.com", subject="Flight", body=f"Booking {bid}")]],
                       "add_functions": []}]}


MATH_TOOLS = ["add", "multiply"]  # the rest of the math env is held out: short contexts, fast tests


def math_task(i, split="test"):
    """A 1-3 turn arithmetic task: add, multiply the sum, then a closing turn without calls."""
    rng = random.Random(i)
    a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 9)
    turns = [{"user": f"What is {a} plus {b}?", "gt": [[{"name": "add", "arguments": {"a": a, "b": b}}]]},
             {"user": f"Multiply that by {c}.", "gt": [[{"name": "multiply", "arguments": {"a": a + b, "b": c}}]]},
             {"user": "Thanks, that is all.", "gt": []}]
    for t in turns:
        t.update(type="normal", add_functions=[])
    held = [n for n in tools.known_schemas({"envs": {"math": {}}}) if n not in MATH_TOOLS]
    return {"id": f"math{i}", "envs": {"math": {}}, "turns": turns[:1 + i % 3], "held_out": held, "split": split, "tags": {}}


def test_ground_truth_passes_with_full_rewards():
    task = travel_task()
    ep = tools.replay(task, tools.ground_truth_calls(task))
    assert ep.done and ep.success and [t["passed"] for t in ep.turns] == [True, True]
    assert ep.reward_parts() == {"format": 1.0, "turns": 1.0, "success": 1.0, "efficiency": 1.0, "awareness": 1.0}
    assert ep.num_calls == 4 and ep.turn_index == [0, 0, 0, 1, 1, 1]
    assert ep.decoded_calls() == [[[s[0]] for s in t["gt"]] for t in task["turns"]]


def test_checker_fails_perturbed_trajectories():
    task = travel_task()
    gt = tools.ground_truth_calls(task)
    dropped = copy.deepcopy(gt)
    dropped[1].pop()  # the send_message: state differs
    wrong = copy.deepcopy(gt)
    wrong[0][1][0]["arguments"]["flight_id"] = "FL2"
    skipped = copy.deepcopy(gt)
    skipped[1].pop(0)  # search_contacts is read-only: state matches, the response check catches it
    for calls, reason in ((dropped, "state mismatch in messages"), (wrong, "state mismatch in travel"),
                          (skipped, "missing result")):
        ep = tools.replay(task, calls)
        assert not ep.success
        first_fail = next(t for t in ep.turns if not t["passed"])  # later turns fail too once the state differs
        assert first_fail["reason"].startswith(reason), first_fail["reason"]
    # a read-only call made in an earlier turn counts for a later one (results so far in the episode)
    early = copy.deepcopy(gt)
    early[0].append(early[1].pop(0))
    assert tools.replay(task, early).success


def test_check_turn_direct():
    a, b = {"x": fresh("bank")}, {"x": fresh("bank")}
    assert tools.check_turn(a, b, ["r1", "r1"], ["r1", "r2", "r1"]) == (True, "")
    assert tools.check_turn(a, b, ["r1", "r1"], ["r1", "r2"])[0] is False  # multiset, not set
    a["x"].transfer("sav", "chk", 1)
    assert tools.check_turn(a, b, [], [])[1].startswith("state mismatch in x: ['accounts', 'next_id', 'transactions']")


def test_episode_messages_and_errors():
    task = travel_task()
    ep = tools.Episode(task)
    msgs = ep.reset()
    assert [m["role"] for m in msgs] == ["system", "user"] and "<summary>" in msgs[0]["content"]
    assert {s["function"]["name"] for s in ep.tools} == set(tools.SCHEMAS[n]["function"]["name"]
                                                          for n in tools.SCHEMAS if tools.OWNER[n] in ("travel", "messages"))
    kind, out = ep.step('<summary>s</summary><plan>p</plan><tool_call>{"name": "search_flights", "arguments": '
                        '{"origin": "SFO"}}</tool_call><tool_call>{"name": "nope", "arguments": {}}</tool_call>'
                        '<tool_call>{broken</tool_call>')
    assert kind == "continue" and [m["role"] for m in out] == ["tool"] * 3
    errors = [json.loads(m["content"])["error"] for m in out]
    assert errors[0].startswith("tool_call: invalid JSON") and "missing required" in errors[1]
    assert errors[2] == "unknown function 'nope'"
    assert ep.turns[0]["format_ok"] == [False] and ep.num_calls == 2 and ep.model_results == []
    kind, out = ep.step("<summary>nothing yet</summary>I could not do it.")
    assert kind == "continue" and out[0]["role"] == "user" and ep.turns[0]["passed"] is False
    assert ep.step("<summary>s</summary>bye") == ("done", []) and ep.done
    assert ep.step("anything") == ("done", [])
    parts = ep.reward_parts()
    assert parts["turns"] == 0 and parts["success"] == 0 and parts["format"] == pytest.approx(2 / 3)


def test_episode_limits():
    task = travel_task()
    call = '<tool_call>{"name": "list_bookings", "arguments": {}}</tool_call>'
    ep = tools.Episode(task, pa=False, max_steps_per_turn=3)
    ep.reset()
    assert [ep.step(call)[0] for _ in range(4)] == ["continue"] * 3 + ["done"]
    assert ep.forced and ep.turns[0]["passed"] is False and "more than 3 steps" in ep.turns[0]["reason"]
    assert ep.decoded_calls() == [] and not ep.success
    ep = tools.Episode(task, pa=False, max_calls=2)
    ep.reset()
    assert ep.step(call * 2)[0] == "continue" and ep.step(call) == ("done", []) and ep.num_calls == 2
    assert "call budget" in ep.turns[0]["reason"]
    ep = tools.Episode(task, pa=False, max_turns=1)
    ep.reset()
    assert ep.step("ok") == ("done", []) and len(ep.turns) == 1
    ep = tools.Episode(task, pa=False, max_tool_chars=120)
    ep.reset()
    _, out = ep.step('<tool_call>{"name": "search_flights", "arguments": {"origin": "SFO", "destination": "JFK", '
                     '"date": "2025-05-01"}}</tool_call>')
    assert len(out[0]["content"]) <= 120 and "output too long" in out[0]["content"]
    assert ep.model_results[0].startswith('{"flights"')  # the checker sees the full result


def test_miss_param_turn():
    task = travel_task(types=("normal", "miss_param"))
    task["turns"][1]["gt"] = []  # "email Ann" without saying what: the right move is to ask
    task["turns"].append({"user": "Subject 'Flight', body 'Booking ...'.", "type": "normal", "gt": [], "add_functions": []})
    gt = tools.ground_truth_calls(task)
    assert tools.replay(task, gt).success
    send = {"name": "send_message", "arguments": {"to": "ann@example.com", "subject": "x", "body": "y"}}
    guessed = copy.deepcopy(gt)
    guessed[1] = [[send]]
    ep = tools.replay(task, guessed)
    assert ep.turns[1]["passed"] is False and not ep.success
    looked = copy.deepcopy(gt)  # a read-only look-up while asking is fine
    looked[1] = [[{"name": "search_contacts", "arguments": {"query": "Ann"}}]]
    assert tools.replay(task, looked).turns[1]["passed"]


def test_miss_func_turn():
    task = travel_task(types=("normal", "miss_func"))
    task["held_out"] = ["send_message"]
    send = task["turns"][1]["gt"][1]
    task["turns"][1]["gt"] = [task["turns"][1]["gt"][0]]
    task["turns"].append({"user": "I have added a function. What about now?", "type": "normal", "gt": [send],
                          "add_functions": ["send_message"]})
    ep = tools.Episode(task, pa=False)
    assert "send_message" not in {s["function"]["name"] for s in ep.tools}
    ep.reset()
    for steps in task["turns"][0]["gt"]:
        ep.step(tools.render_message(None, None, steps))
    ep.step("booked")
    _, out = ep.step(tools.render_message(None, None, [send[0]]))
    assert json.loads(out[0]["content"])["error"] == "function 'send_message' is not available"
    ep.step(tools.render_message(None, None, task["turns"][1]["gt"][0]))
    kind, out = ep.step("I cannot send e-mail with the functions I have.")
    assert kind == "continue" and "<tools>" in out[0]["content"] and '"name": "send_message"' in out[0]["content"]
    ep.step(tools.render_message(None, None, send))
    ep.step("sent")
    assert ep.done and ep.success, [t["reason"] for t in ep.turns]


def test_error_recovery_turn():
    # the first booking attempt fails (over budget); the gt includes the failing call and the fix
    task = travel_task(types=("error_recovery", "normal"))
    task["turns"][0]["gt"].insert(1, [{"name": "book_flight", "arguments": {"flight_id": "FL2", "passenger": "Ann Lee"}}])
    assert tools.replay(task, tools.ground_truth_calls(task)).success


def test_long_context_turn():
    cfg = copy.deepcopy(CONFIGS["files"])
    cfg["files"].update({f"/home/filler_{i}.txt": "x" * 200 for i in range(200)})
    task = {"id": "lc", "envs": {"files": cfg}, "held_out": [], "turns": [
        {"user": "What is in a.txt?", "type": "long_context", "gt": [[{"name": "ls", "arguments": {}}],
                                                                   [{"name": "cat", "arguments": {"path": "a.txt"}}]]}]}
    ep = tools.replay(task, tools.ground_truth_calls(task), max_tool_chars=2000)
    assert ep.success and max(len(m["content"]) for m in ep.messages if m["role"] == "tool") <= 2000


def test_summary_mode_reset():
    task = travel_task()
    ep = tools.Episode(task, context_mode="summary")
    ep.reset()
    ep.step(tools.render_message("start", "search_flights then book_flight", task["turns"][0]["gt"][0]))
    ep.step(tools.render_message("FL1 is cheapest at 300.0", "book_flight FL1", task["turns"][0]["gt"][1]))
    kind, msgs = ep.step("<summary>Booked FL1 for Ann Lee, booking id known.</summary>Done.")
    assert kind == "reset" and [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == tools.system_prompt(True)
    assert "<summary>Booked FL1 for Ann Lee, booking id known.</summary>" in msgs[1]["content"]
    assert "<plan>" not in msgs[1]["content"]   # the final reply closed the plan: "book_flight FL1" is done
    assert msgs[1]["content"].endswith("New request: Email Ann the booking id.")
    assert tools.Episode(task, context_mode="full").reset()[1]["content"] == task["turns"][0]["user"]


def test_awareness_score_matches_whole_tokens():
    assert tools.awareness_score("Created e10.", "Next: send_message.", ["e1"], ["send"]) == 0.0
    assert tools.awareness_score("Created E1 (12.5 USD) at /docs/a.txt.", "Next: send_message, then ls.",
                                 ["e1", "12.5", "/docs/a.txt"], ["send_message", "ls"]) == 1.0
    assert tools.awareness_score("Total 12.50", None, ["12.5"], []) == 0.0   # another literal; no plan: 0 for its half
    assert tools.awareness_score("Total 12.50", "", ["12.5"], []) == 0.5     # an empty plan with nothing left is right
    assert tools.awareness_score("", "ls", [], ["ls"]) == 1.0                # nothing to carry: an empty summary is right
    assert tools.awareness_score(None, "ls", [], ["ls"]) == 0.5
    # plans are counted with repeats: two get_balance calls need the name twice
    assert tools.awareness_score("", "Next: get_balance.", [], ["get_balance", "get_balance"]) == 0.75
    assert tools.awareness_score("", "Next: get_balance and get_balance.", [], ["get_balance", "get_balance"]) == 1.0


def test_rewards_hand_built():
    task = travel_task()
    gt = tools.ground_truth_calls(task)
    # no progress awareness written (pa=True expects it): format 0, awareness 0, the task still succeeds
    ep = tools.replay(task, gt, pa=False)
    ep2 = tools.Episode(task, pa=True)
    ep2.reset()
    for turn in gt:
        for steps in turn:
            ep2.step(tools.render_message(None, None, steps))
        ep2.step("done")
    parts = ep2.reward_parts()
    assert parts["success"] == 1 and parts["format"] == 0 and parts["awareness"] == 0
    assert ep.reward_parts()["format"] == 1  # pa=False episode judged by the no-pa format
    # redundant calls: one repeated search and one extra call in turn 0
    noisy = copy.deepcopy(gt)
    noisy[0].insert(1, copy.deepcopy(noisy[0][0]))
    noisy[0].insert(1, [{"name": "list_bookings", "arguments": {}}])
    parts = tools.replay(task, noisy).reward_parts()
    assert parts["success"] == 1 and parts["efficiency"] == pytest.approx(1 - (2 + 1) / 4)
    # a summary that forgets the flight id and a plan that names nothing
    ep3 = tools.Episode(task)
    ep3.reset()
    ep3.step(tools.render_message("starting", "search_flights, book_flight", gt[0][0]))
    ep3.step(tools.render_message("found flights", "book it", gt[0][1]))
    ep3.step("<summary>booked</summary>ok")
    assert ep3.reward_parts()["awareness"] == pytest.approx((1.0 + 0.0) / 2)
    assert tools.total_reward({"a": 0.5, "b": 1.0}, {"a": 2.0, "b": 1.0}) == 2.0
    with pytest.raises(ValueError):
        tools.total_reward({"a": 1.0}, {"zz": 1.0})


# ----------------------------------------------------------------------------------------------
# fuzz: random and mutated assistant messages through parse -> execute, zero exceptions

def _random_value(rng):
    return rng.choice([0, -1, 2**70, 1.5, -0.0, 1e308, True, None, "", "x" * rng.randint(0, 50), "ünï\u202e😀",
                       "it's \"nested\" 'quotes'", "</tool_call>", [1, "a"], {"k": [None]}, "../../etc", "/"])


def _random_message(rng, names):
    calls = []
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(names)
        props = tools.SCHEMAS[name]["function"]["parameters"]["properties"] if name in tools.SCHEMAS else {}
        args = {k: _random_value(rng) for k in props if rng.random() < 0.7}
        if rng.random() < 0.2:
            args[rng.choice(["zz", "path", ""])] = _random_value(rng)
        calls.append({"name": name, "arguments": args})
    text = tools.render_message(rng.choice([None, "s"]), rng.choice([None, "p"]), calls, rng.choice(["", "hi"]))
    for _ in range(rng.randint(0, 3)):  # mutations
        i = rng.randint(0, len(text))
        text = rng.choice([
            lambda: text[:i],
            lambda: text[:i] + rng.choice(["<tool_call>", "</tool_call>", "<summary>", "</plan>", "{", "}", "\"", "\\",
                                           "\x00", "\ud800", "NaN", "[" * 3000, "😀" * 50]) + text[i:],
            lambda: text[:i] + text[i + rng.randint(1, 20):],
            lambda: text + text,
            lambda: text.replace('"', "'"),
            lambda: text.replace("{", "{\"arguments\": " + '{"path": "' + "y" * 30000 + '"}, ', 1),
            lambda: "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 40))),
        ])()
    return text


@pytest.mark.parametrize("seed", range(4))  # 4 x 2,500 = 10,000 messages, split to keep each test short
def test_fuzz_parse_execute_never_raises(seed):
    rng = random.Random(seed)
    task = {"id": "fuzz", "envs": {n: CONFIGS[n] for n in tools.ENVS}, "held_out": ["sqrt"],
            "turns": [{"user": "fuzz", "type": "normal", "gt": []}] * 20}
    names = list(tools.SCHEMAS) + ["nope", "__init__", "_state", "eval"]
    ep, n, kinds = None, 0, Counter()
    for n in range(2_500):
        if ep is None or ep.done:
            ep = tools.Episode(task, pa=rng.random() < 0.5, context_mode=rng.choice(["full", "summary"]),
                               max_steps_per_turn=30, max_calls=300, max_tool_chars=600)
            ep.reset()
        text = _random_message(rng, names)
        kind, msgs = ep.step(text)
        kinds[kind] += 1
        assert all(isinstance(m["content"], str) and len(m["content"]) <= 600 for m in msgs if m["role"] == "tool")
        tools.parse_python_calls(text)
        if ep.done:
            assert all(0 <= v <= 1 for v in ep.reward_parts().values())
    assert n + 1 == 2_500 and kinds["continue"] > 1000 and kinds["done"] > 5 and kinds["reset"] > 5
    for e in ep.envs.values():  # the state is still plain data
        json.dumps(e._state())



# ----------------------------------------------------------------------------------------------
# BFCL: ground truth through our Episode scores 800/800 with the official checker

def _bfcl_replay(category, limit=None):
    tasks = tools.bfcl_tasks(category, limit)
    ok_official = ok_own = 0
    for t in tasks:
        ep = tools.replay(t, tools.ground_truth_calls(t))
        ok_official += tools.bfcl_score(t, ep.decoded_calls())
        ok_own += ep.success
    return len(tasks), ok_official, ok_own


@pytest.fixture(scope="module")
def bfcl():
    if not tools.bfcl_available():
        pytest.skip("bfcl-eval not installed")
    # the heavy modules (every API SDK) must never be imported
    assert not {"bfcl_eval.eval_checker.eval_runner", "bfcl_eval.constants.model_config"} & set(sys.modules)


@pytest.mark.parametrize("category", tools.BFCL_CATEGORIES)
def test_bfcl_ground_truth_replay_all(bfcl, category):
    t0 = time.time()
    n, official, own = _bfcl_replay(category)
    assert (n, official, own) == (200, 200, 200)
    print(f"BFCL {category}: {official}/{n} official, {own}/{n} own checker, {time.time() - t0:.2f}s")


def test_bfcl_no_calls_and_dropped_call_fail(bfcl):
    tasks = tools.bfcl_tasks("base", 20) + tools.bfcl_tasks("miss_func", 10)
    assert sum(tools.bfcl_score(t, [[] for _ in t["turns"]]) for t in tasks) == 0
    for t in tasks[:10]:
        gt = tools.ground_truth_calls(t)
        last = max(i for i, turn in enumerate(gt) if turn)
        gt[last] = gt[last][:-1] if len(gt[last]) > 1 or len(gt[last][0]) == 1 else [gt[last][0][:-1]]
        ep = tools.replay(t, gt)
        assert not tools.bfcl_score(t, ep.decoded_calls()) and not ep.success
    assert not tools.bfcl_score(tasks[0], [])  # force-terminated (too few turns) fails


def test_bfcl_task_format(bfcl):
    t = next(t for t in tools.bfcl_tasks("miss_func", 5) if t["held_out"])
    ep = tools.Episode(t)
    offered = {s["function"]["name"] for s in ep.tools}
    assert not offered & set(t["held_out"]) and all(s["function"]["parameters"]["type"] == "object" for s in ep.tools)
    add = next(i for i, turn in enumerate(t["turns"]) if turn["add_functions"])
    assert t["turns"][add]["user"] == tools.ADD_FUNCTIONS_MESSAGE and t["turns"][add - 1]["type"] == "miss_func"
    # positional ground truth (sort('final_report.pdf') in miss_func_0) became keywords
    t0 = tools.bfcl_tasks("miss_func", 1)[0]
    assert {"name": "sort", "arguments": {"file_name": "final_report.pdf"}} in [c for turn in t0["turns"]
                                                                                 for s in turn["gt"] for c in s]


def test_carry_next_takes_an_empty_summary():
    # an empty summary means "nothing to carry", not "no summary written": it replaces the previous one
    p = lambda text: tools.parse_message(text)  # noqa: E731
    assert tools.carry_next("old", "Next: x.", p("<summary></summary>Done.")) == ("", None)
    assert tools.carry_next("old", "Next: x.", p("Done.")) == ("old", "Next: x.")
    assert tools.carry_next("old", None, p("<summary>new</summary><plan>Next: y.</plan>")) == ("new", "Next: y.")


def test_the_recovery_is_planned_only_after_the_failing_call_fails():
    spec = {"user": "buy", "fails": [0], "gt": [[{"name": "place_order", "arguments": {"p": 1}}],
                                                [{"name": "get_quote", "arguments": {}}],
                                                [{"name": "place_order", "arguments": {"p": 2}}]]}
    rec = {"calls": [], "executed": [], "errors": []}
    names = lambda: [[c["name"] for c in s] for s in tools.remaining_steps(spec, rec)]  # noqa: E731
    assert names() == [["place_order"]]
    rec.update(calls=[{"name": "nope", "arguments": {}}], executed=[False], errors=["unknown function 'nope'"])
    assert names() == [["place_order"]]          # an unrelated error tells nothing about the order
    rec["calls"].append({"name": "place_order", "arguments": {"p": 1}})
    rec["executed"].append(True)
    rec["errors"].append("price changed")
    assert names() == [["get_quote"], ["place_order"]]
