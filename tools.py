"""The tool world of PARL-MT: environments, schemas, the call protocol, checkers, rewards, Episode.

Torch-free. Every other stage (gen_data.py, sft.py, rl.py, eval.py) gets its tools, its parser and
its scoring from here, so that what is trained on is exactly what is evaluated.

    envs     seven stateful domains (ENVS); each public method is a tool, each public attribute is state
    schemas  OpenAI-style JSON schemas generated from type hints + docstrings (schema, tool_schemas)
    protocol <summary>/<plan>/<tool_call>{json}</tool_call> messages (parse_message, render_message) and
             BFCL's python-list format (parse_python_calls, render_python_calls), both via json/ast only
    checker  BFCL semantics per user turn: state check + response check (check_turn)
    Episode  text in, text out state machine for one multi-turn task, with the reward parts
    BFCL     bfcl_tasks / bfcl_score run the official multi-turn benchmark through the same Episode

Nothing a model writes is ever eval'd; nothing a model writes makes this module raise.
"""
import ast
import copy
import datetime
import importlib
import inspect
import json
import math
import os
import posixpath
import random
import re
import types
import typing
import uuid
from collections import Counter
from dataclasses import dataclass, field


def read_only(fn):
    """Mark a tool that only reads state (the checker and the efficiency reward use this)."""
    fn.read_only = True
    return fn


def _err(msg: str) -> dict:
    return {"error": msg}


def _date(s):
    """ISO date string -> datetime.date, or None when malformed (models get dates wrong a lot)."""
    try:
        return datetime.date.fromisoformat(s)
    except (TypeError, ValueError):
        return None


def _minutes(hhmm):
    """'HH:MM' -> minutes after midnight, or None when malformed."""
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", hhmm or "")
    return int(m.group(1)) * 60 + int(m.group(2)) if m else None


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


class Env:
    """Base of all environments: public methods are the tools, public attributes are the state.

    The state is plain data so that two environments compare with `==` (the BFCL state check).
    Randomness comes only from self._rng, seeded by config["seed"]: same config + same calls ->
    same outputs. Private attributes (leading underscore) are not state.
    """

    def __init__(self, config: dict):
        self._rng = random.Random(config.get("seed", 0))

    def _state(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def _call(self, name: str, args: dict):
        try:
            return getattr(self, name)(**args)
        except Exception as e:  # a bug in a tool must not kill a rollout; it reads as an error result
            return _err(f"internal error in {name}: {type(e).__name__}: {e}")

    def _result_text(self, result) -> str:
        """Canonical text of a result, what the response check compares."""
        return json.dumps(result, sort_keys=True, ensure_ascii=False, default=str)

    def _result_obj(self, result):
        return result


# ----------------------------------------------------------------------------------------------
# Environments. Each class docstring documents its config (what gen_data.py builds).

class FileSystem(Env):
    """A small Unix-like file system.

    Config: {"files": {"/abs/path.txt": "content", ...}, "dirs": ["/abs/dir", ...], "cwd": "/"}.
    Parent directories of files are created implicitly. State: files, dirs (sorted), cwd.
    """

    def __init__(self, config: dict):
        super().__init__(config)
        self.files = dict(config.get("files", {}))
        dirs = {"/"} | set(config.get("dirs", []))
        for p in list(dirs) + list(self.files):
            while p != "/":
                p = posixpath.dirname(p)
                dirs.add(p)
        self.dirs = sorted(dirs)
        self.cwd = config.get("cwd", "/")

    def _abs(self, path):
        if not isinstance(path, str) or not path.strip():
            return None
        return posixpath.normpath(posixpath.join(self.cwd, path)).replace("//", "/")

    def _parent_ok(self, p):
        return posixpath.dirname(p) in self.dirs

    @read_only
    def pwd(self) -> dict:
        """Show the current working directory.
        Returns: {"cwd": absolute path}."""
        return {"cwd": self.cwd}

    @read_only
    def ls(self, path: str = ".") -> dict:
        """List a directory; sub-directories end with '/'.
        Args:
            path: directory to list, absolute or relative to the current directory.
        Returns: {"path": absolute path, "entries": sorted names}. Fails if the directory does not exist."""
        p = self._abs(path)
        if p not in self.dirs:
            return _err(f"no such directory: {path}")
        names = [posixpath.basename(d) + "/" for d in self.dirs if d != p and posixpath.dirname(d) == p]
        names += [posixpath.basename(f) for f in self.files if posixpath.dirname(f) == p]
        return {"path": p, "entries": sorted(names)}

    def cd(self, path: str) -> dict:
        """Change the current directory.
        Args:
            path: target directory ('..' goes up).
        Returns: {"cwd": new absolute path}. Fails if the directory does not exist."""
        p = self._abs(path)
        if p not in self.dirs:
            return _err(f"no such directory: {path}")
        self.cwd = p
        return {"cwd": p}

    def mkdir(self, path: str) -> dict:
        """Create a directory.
        Args:
            path: the new directory; its parent must exist.
        Returns: {"created": absolute path}. Fails if it exists or the parent is missing."""
        p = self._abs(path)
        if p is None or p in self.dirs or p in self.files:
            return _err(f"already exists or invalid: {path}")
        if not self._parent_ok(p):
            return _err(f"parent directory does not exist: {posixpath.dirname(p)}")
        self.dirs = sorted(self.dirs + [p])
        return {"created": p}

    def touch(self, path: str) -> dict:
        """Create an empty file if it does not exist.
        Args:
            path: the file.
        Returns: {"path": absolute path}. Fails if it is a directory or the parent is missing."""
        p = self._abs(path)
        if p is None or p in self.dirs:
            return _err(f"is a directory or invalid: {path}")
        if not self._parent_ok(p):
            return _err(f"parent directory does not exist: {posixpath.dirname(p)}")
        self.files.setdefault(p, "")
        return {"path": p}

    def write(self, path: str, content: str, append: bool = False) -> dict:
        """Write text to a file, creating it if needed.
        Args:
            path: the file.
            content: text to write.
            append: add to the end instead of replacing the content.
        Returns: {"path": absolute path, "size": characters in the file}. Fails if the parent is missing."""
        p = self._abs(path)
        if p is None or p in self.dirs:
            return _err(f"is a directory or invalid: {path}")
        if not self._parent_ok(p):
            return _err(f"parent directory does not exist: {posixpath.dirname(p)}")
        self.files[p] = (self.files.get(p, "") if append else "") + content
        return {"path": p, "size": len(self.files[p])}

    @read_only
    def cat(self, path: str) -> dict:
        """Read a file.
        Args:
            path: the file.
        Returns: {"path": absolute path, "content": text}. Fails if the file does not exist."""
        p = self._abs(path)
        if p not in self.files:
            return _err(f"no such file: {path}")
        return {"path": p, "content": self.files[p]}

    @read_only
    def head(self, path: str, lines: int = 5) -> dict:
        """Show the first lines of a file.
        Args:
            path: the file.
            lines: how many lines (1-100).
        Returns: {"path": absolute path, "content": the first lines}. Fails if the file does not exist."""
        p = self._abs(path)
        if p not in self.files:
            return _err(f"no such file: {path}")
        if not 1 <= lines <= 100:
            return _err("lines must be between 1 and 100")
        return {"path": p, "content": "\n".join(self.files[p].split("\n")[:lines])}

    def _move_or_copy(self, source, destination, keep):
        s, d = self._abs(source), self._abs(destination)
        if s is None or d is None:
            return _err("source and destination must be non-empty paths")
        if d in self.dirs:  # into an existing directory, like mv/cp
            d = posixpath.join(d, posixpath.basename(s))
        if s in self.files:
            if d in self.files or d in self.dirs:
                return _err(f"destination exists: {d}")
            if not self._parent_ok(d):
                return _err(f"parent directory does not exist: {posixpath.dirname(d)}")
            self.files[d] = self.files[s]
            if not keep:
                del self.files[s]
            return {"source": s, "destination": d}
        if s in self.dirs and not keep and s != "/":
            if d == s or d.startswith(s + "/") or d in self.dirs or d in self.files:
                return _err(f"cannot move {s} to {d}")
            if not self._parent_ok(d):
                return _err(f"parent directory does not exist: {posixpath.dirname(d)}")
            moved = lambda p: d + p[len(s):] if p == s or p.startswith(s + "/") else p  # noqa: E731
            self.dirs = sorted(moved(p) for p in self.dirs)
            self.files = {moved(p): c for p, c in self.files.items()}
            if self.cwd == s or self.cwd.startswith(s + "/"):
                self.cwd = moved(self.cwd)
            return {"source": s, "destination": d}
        return _err(f"no such file{'' if keep else ' or directory'}: {source}")

    def mv(self, source: str, destination: str) -> dict:
        """Move or rename a file or directory.
        Args:
            source: the file or directory to move.
            destination: the new path, or an existing directory to move into.
        Returns: {"source": old absolute path, "destination": new absolute path}. Fails if the source is missing or
            the destination exists."""
        return self._move_or_copy(source, destination, keep=False)

    def cp(self, source: str, destination: str) -> dict:
        """Copy a file.
        Args:
            source: the file to copy.
            destination: the new path, or an existing directory to copy into.
        Returns: {"source": absolute path, "destination": absolute path of the copy}. Fails if the source is not a
            file or the destination exists."""
        return self._move_or_copy(source, destination, keep=True)

    def rm(self, path: str) -> dict:
        """Remove a file or an empty directory.
        Args:
            path: what to remove.
        Returns: {"removed": absolute path}. Fails if it does not exist, is not empty, or is the current directory."""
        p = self._abs(path)
        if p in self.files:
            del self.files[p]
            return {"removed": p}
        if p in self.dirs and p != "/":
            if any(x.startswith(p + "/") for x in list(self.dirs) + list(self.files)):
                return _err(f"directory not empty: {p}")
            if self.cwd == p:
                return _err("cannot remove the current directory")
            self.dirs = [d for d in self.dirs if d != p]
            return {"removed": p}
        return _err(f"no such file or directory: {path}")

    @read_only
    def find(self, name: str, path: str = ".") -> dict:
        """Find files and directories whose name contains a string.
        Args:
            name: substring of the base name (case-sensitive).
            path: directory to search under.
        Returns: {"matches": sorted absolute paths}. Fails if the directory does not exist."""
        p = self._abs(path)
        if p not in self.dirs:
            return _err(f"no such directory: {path}")
        under = lambda x: x != p and (p == "/" or x.startswith(p + "/"))  # noqa: E731
        hits = [x for x in list(self.dirs) + list(self.files) if under(x) and name in posixpath.basename(x)]
        return {"matches": sorted(hits)}

    @read_only
    def grep(self, pattern: str, path: str) -> dict:
        """Lines of a file that contain a string (plain substring, no regex).
        Args:
            pattern: the text to look for.
            path: the file.
        Returns: {"path": absolute path, "lines": matching lines}. Fails if the file does not exist."""
        p = self._abs(path)
        if p not in self.files:
            return _err(f"no such file: {path}")
        return {"path": p, "lines": [ln for ln in self.files[p].split("\n") if pattern in ln]}

    @read_only
    def wc(self, path: str) -> dict:
        """Count lines, words and characters of a file.
        Args:
            path: the file.
        Returns: {"lines": int, "words": int, "chars": int}. Fails if the file does not exist."""
        p = self._abs(path)
        if p not in self.files:
            return _err(f"no such file: {path}")
        c = self.files[p]
        return {"lines": len(c.split("\n")) if c else 0, "words": len(c.split()), "chars": len(c)}

    @read_only
    def sort(self, path: str) -> dict:
        """The lines of a file in sorted order (the file is not changed).
        Args:
            path: the file.
        Returns: {"content": sorted lines joined by newlines}. Fails if the file does not exist."""
        p = self._abs(path)
        if p not in self.files:
            return _err(f"no such file: {path}")
        return {"content": "\n".join(sorted(self.files[p].split("\n")))}

    @staticmethod
    def _sample(rng):
        words = ["budget", "report", "notes", "draft", "invoice", "summary", "todo", "plan", "data", "log"]
        dirs = ["/home", "/home/docs", "/home/archive", "/tmp"]
        files = {}
        for _ in range(rng.randint(3, 6)):
            d, w = rng.choice(dirs), rng.choice(words)
            lines = [f"{rng.choice(words)} {rng.randint(1, 99)}" for _ in range(rng.randint(1, 5))]
            files[f"{d}/{w}_{rng.randint(1, 9)}.txt"] = "\n".join(lines)
        return {"files": files, "dirs": dirs, "cwd": "/home"}


class Messaging(Env):
    """E-mail with an address book.

    Config: {"user": "me@example.com",
             "contacts": {"c1": {"name": "Ann Lee", "email": "ann@example.com", "phone": "555-0101"}, ...},
             "inbox": {"m1": {"from": "ann@example.com", "subject": str, "body": str, "read": False}, ...}}.
    State: user, contacts, inbox, sent ({"m7": {"to", "subject", "body"}}), next_id (int, for new ids).
    Messages can only be sent to saved contacts, so sending usually needs search_contacts first.
    """

    def __init__(self, config: dict):
        super().__init__(config)
        self.user = config.get("user", "me@example.com")
        self.contacts = copy.deepcopy(config.get("contacts", {}))
        self.inbox = copy.deepcopy(config.get("inbox", {}))
        self.sent = copy.deepcopy(config.get("sent", {}))
        self.next_id = int(config.get("next_id", 100))

    def _new_id(self, prefix):
        self.next_id += 1
        return f"{prefix}{self.next_id}"

    @read_only
    def search_contacts(self, query: str) -> dict:
        """Search the address book by name or e-mail (case-insensitive substring).
        Args:
            query: part of a name or an e-mail address.
        Returns: {"contacts": [{"id", "name", "email"}]} (possibly empty)."""
        q = query.lower()
        hits = [{"id": i, "name": c["name"], "email": c["email"]} for i, c in sorted(self.contacts.items())
                if q in c["name"].lower() or q in c["email"].lower()]
        return {"contacts": hits}

    @read_only
    def get_contact(self, contact_id: str) -> dict:
        """Full details of one contact.
        Args:
            contact_id: id from search_contacts.
        Returns: {"id", "name", "email", "phone"}. Fails if the id is unknown."""
        if contact_id not in self.contacts:
            return _err(f"unknown contact id: {contact_id}")
        return {"id": contact_id, **self.contacts[contact_id]}

    def add_contact(self, name: str, email: str, phone: str = "") -> dict:
        """Save a new contact.
        Args:
            name: full name.
            email: e-mail address (must contain '@' and be new).
            phone: phone number, optional.
        Returns: {"contact_id": new id}. Fails on a malformed or already saved e-mail."""
        if "@" not in email or not name.strip():
            return _err("a contact needs a name and an e-mail address containing '@'")
        if any(c["email"] == email for c in self.contacts.values()):
            return _err(f"e-mail already saved: {email}")
        cid = self._new_id("c")
        self.contacts[cid] = {"name": name, "email": email, "phone": phone}
        return {"contact_id": cid}

    def update_contact(self, contact_id: str, field: typing.Literal["name", "email", "phone"], value: str) -> dict:
        """Change one field of a contact.
        Args:
            contact_id: id from search_contacts.
            field: which field to change.
            value: the new value.
        Returns: {"contact_id", field: value}. Fails if the id is unknown."""
        if contact_id not in self.contacts:
            return _err(f"unknown contact id: {contact_id}")
        self.contacts[contact_id][field] = value
        return {"contact_id": contact_id, field: value}

    def delete_contact(self, contact_id: str) -> dict:
        """Delete a contact.
        Args:
            contact_id: id from search_contacts.
        Returns: {"deleted": contact_id}. Fails if the id is unknown."""
        if self.contacts.pop(contact_id, None) is None:
            return _err(f"unknown contact id: {contact_id}")
        return {"deleted": contact_id}

    def send_message(self, to: str, subject: str, body: str) -> dict:
        """Send an e-mail to a saved contact.
        Args:
            to: the recipient's e-mail address (from search_contacts or get_contact).
            subject: subject line.
            body: message text.
        Returns: {"message_id": new id}. Fails if the address is not a saved contact."""
        if not any(c["email"] == to for c in self.contacts.values()):
            return _err(f"recipient is not a saved contact: {to}")
        mid = self._new_id("m")
        self.sent[mid] = {"to": to, "subject": subject, "body": body}
        return {"message_id": mid}

    @read_only
    def list_inbox(self, unread_only: bool = False) -> dict:
        """List received messages (without bodies).
        Args:
            unread_only: only messages not read yet.
        Returns: {"messages": [{"id", "from", "subject", "read"}]}."""
        return {"messages": [{"id": i, "from": m["from"], "subject": m["subject"], "read": m["read"]}
                             for i, m in sorted(self.inbox.items()) if not (unread_only and m["read"])]}

    def read_message(self, message_id: str) -> dict:
        """Open a received message; it is marked as read.
        Args:
            message_id: id from list_inbox or search_messages.
        Returns: {"id", "from", "subject", "body"}. Fails if the id is not in the inbox."""
        m = self.inbox.get(message_id)
        if m is None:
            return _err(f"no message {message_id} in the inbox")
        m["read"] = True
        return {"id": message_id, "from": m["from"], "subject": m["subject"], "body": m["body"]}

    def reply(self, message_id: str, body: str) -> dict:
        """Reply to a received message (to its sender, subject 'Re: ...').
        Args:
            message_id: id of the received message.
            body: reply text.
        Returns: {"message_id": id of the reply}. Fails if the id is not in the inbox."""
        m = self.inbox.get(message_id)
        if m is None:
            return _err(f"no message {message_id} in the inbox")
        mid = self._new_id("m")
        self.sent[mid] = {"to": m["from"], "subject": "Re: " + m["subject"], "body": body}
        return {"message_id": mid}

    def delete_message(self, message_id: str) -> dict:
        """Delete a received or sent message.
        Args:
            message_id: the message id.
        Returns: {"deleted": message_id}. Fails if no such message exists."""
        if self.inbox.pop(message_id, None) is None and self.sent.pop(message_id, None) is None:
            return _err(f"no message {message_id}")
        return {"deleted": message_id}

    @read_only
    def search_messages(self, query: str) -> dict:
        """Search received and sent messages by subject or body (case-insensitive substring).
        Args:
            query: text to look for.
        Returns: {"messages": [{"id", "folder", "subject"}]}."""
        q = query.lower()
        hits = [{"id": i, "folder": f, "subject": m["subject"]}
                for f, box in (("inbox", self.inbox), ("sent", self.sent)) for i, m in sorted(box.items())
                if q in m["subject"].lower() or q in m["body"].lower()]
        return {"messages": hits}

    @staticmethod
    def _sample(rng):
        names = ["Ann Lee", "Bo Chen", "Carla Diaz", "Dev Patel", "Eve Martin", "Femi Ade"]
        contacts = {}
        for i, n in enumerate(rng.sample(names, 4)):
            contacts[f"c{i + 1}"] = {"name": n, "email": n.split()[0].lower() + "@example.com",
                                     "phone": f"555-01{rng.randint(10, 99)}"}
        c = list(contacts.values())
        inbox = {f"m{i + 1}": {"from": rng.choice(c)["email"], "subject": s, "body": f"About the {s.lower()}.",
                               "read": False} for i, s in enumerate(["Budget", "Lunch", "Trip plan"])}
        return {"user": "me@example.com", "contacts": contacts, "inbox": inbox}


class Calendar(Env):
    """A personal calendar. Dates are 'YYYY-MM-DD', times 'HH:MM' (24 h).

    Config: {"today": "2025-03-03",
             "events": {"e1": {"title": str, "date": str, "start": "09:00", "end": "10:00", "attendees": [emails]}}}.
    State: today, events, next_id. Events may not overlap.
    """

    def __init__(self, config: dict):
        super().__init__(config)
        self.today = config.get("today", "2025-03-03")
        self.events = copy.deepcopy(config.get("events", {}))
        self.next_id = int(config.get("next_id", 100))

    def _conflict(self, date, start, end, skip=None):
        for i, e in sorted(self.events.items()):
            if i != skip and e["date"] == date and _minutes(e["start"]) < end and start < _minutes(e["end"]):
                return i
        return None

    @read_only
    def list_events(self, date: str) -> dict:
        """Events on one day, by start time.
        Args:
            date: the day, 'YYYY-MM-DD'.
        Returns: {"events": [{"id", "title", "start", "end"}]}. Fails on a malformed date."""
        if _date(date) is None:
            return _err(f"malformed date {date!r}; use YYYY-MM-DD")
        evs = sorted((e["start"], i) for i, e in self.events.items() if e["date"] == date)
        return {"events": [{"id": i, "title": self.events[i]["title"], "start": s, "end": self.events[i]["end"]}
                           for s, i in evs]}

    @read_only
    def get_event(self, event_id: str) -> dict:
        """Full details of one event.
        Args:
            event_id: id from list_events or search_events.
        Returns: {"id", "title", "date", "start", "end", "attendees"}. Fails if the id is unknown."""
        if event_id not in self.events:
            return _err(f"unknown event id: {event_id}")
        return {"id": event_id, **self.events[event_id]}

    @read_only
    def search_events(self, query: str) -> dict:
        """Find events whose title contains a string (case-insensitive).
        Args:
            query: part of the title.
        Returns: {"events": [{"id", "title", "date", "start"}]}."""
        return {"events": [{"id": i, "title": e["title"], "date": e["date"], "start": e["start"]}
                           for i, e in sorted(self.events.items()) if query.lower() in e["title"].lower()]}

    def create_event(self, title: str, date: str, start: str, end: str, attendees: list[str] | None = None) -> dict:
        """Add an event.
        Args:
            title: what the event is.
            date: the day, 'YYYY-MM-DD'.
            start: start time 'HH:MM'.
            end: end time 'HH:MM', after start.
            attendees: e-mail addresses to invite, optional.
        Returns: {"event_id": new id}. Fails on malformed times, end before start, or an overlap (names the event)."""
        s, e = _minutes(start), _minutes(end)
        if _date(date) is None or s is None or e is None or e <= s:
            return _err("need date YYYY-MM-DD and times HH:MM with end after start")
        clash = self._conflict(date, s, e)
        if clash:
            return _err(f"overlaps event {clash} ({self.events[clash]['title']})")
        self.next_id += 1
        eid = f"e{self.next_id}"
        self.events[eid] = {"title": title, "date": date, "start": start, "end": end,
                            "attendees": list(attendees or [])}
        return {"event_id": eid}

    def move_event(self, event_id: str, date: str, start: str) -> dict:
        """Move an event to a new day/start time, keeping its length.
        Args:
            event_id: the event.
            date: new day 'YYYY-MM-DD'.
            start: new start time 'HH:MM'.
        Returns: {"event_id", "date", "start", "end"}. Fails if unknown, malformed, past midnight, or overlapping."""
        ev = self.events.get(event_id)
        s = _minutes(start)
        if ev is None:
            return _err(f"unknown event id: {event_id}")
        if _date(date) is None or s is None:
            return _err("need date YYYY-MM-DD and start HH:MM")
        e = s + _minutes(ev["end"]) - _minutes(ev["start"])
        if e >= 24 * 60:
            return _err("the event would end after midnight")
        clash = self._conflict(date, s, e, skip=event_id)
        if clash:
            return _err(f"overlaps event {clash} ({self.events[clash]['title']})")
        ev.update(date=date, start=start, end=_hhmm(e))
        return {"event_id": event_id, "date": date, "start": start, "end": ev["end"]}

    def cancel_event(self, event_id: str) -> dict:
        """Delete an event.
        Args:
            event_id: the event.
        Returns: {"cancelled": event_id}. Fails if the id is unknown."""
        if self.events.pop(event_id, None) is None:
            return _err(f"unknown event id: {event_id}")
        return {"cancelled": event_id}

    def add_attendee(self, event_id: str, email: str) -> dict:
        """Invite someone to an event.
        Args:
            event_id: the event.
            email: the invitee's e-mail address.
        Returns: {"event_id", "attendees": all attendees}. Fails if the id is unknown, the address lacks '@' or is
            already invited."""
        ev = self.events.get(event_id)
        if ev is None:
            return _err(f"unknown event id: {event_id}")
        if "@" not in email or email in ev["attendees"]:
            return _err(f"malformed or already invited: {email}")
        ev["attendees"].append(email)
        return {"event_id": event_id, "attendees": list(ev["attendees"])}

    @read_only
    def find_free_slot(self, date: str, duration_minutes: int, earliest: str = "09:00", latest: str = "17:00") -> dict:
        """The earliest free slot of a given length on a day.
        Args:
            date: the day 'YYYY-MM-DD'.
            duration_minutes: length of the slot (1-600).
            earliest: the slot may not start before this time 'HH:MM'.
            latest: the slot must end by this time 'HH:MM'.
        Returns: {"date", "start", "end"}. Fails if malformed or there is no free slot."""
        lo, hi = _minutes(earliest), _minutes(latest)
        if _date(date) is None or lo is None or hi is None or not 1 <= duration_minutes <= 600:
            return _err("need date YYYY-MM-DD, times HH:MM and a duration of 1-600 minutes")
        t = lo
        while t + duration_minutes <= hi:  # step 15 min: slots land on quarter hours
            if self._conflict(date, t, t + duration_minutes) is None:
                return {"date": date, "start": _hhmm(t), "end": _hhmm(t + duration_minutes)}
            t += 15
        return _err(f"no free {duration_minutes}-minute slot on {date} between {earliest} and {latest}")

    @staticmethod
    def _sample(rng):
        titles = ["Standup", "Design review", "Lunch with Bo", "Dentist", "1:1 with Ann", "Gym"]
        events = {}
        for i, t in enumerate(rng.sample(titles, 4)):
            h = 8 + 2 * i
            events[f"e{i + 1}"] = {"title": t, "date": f"2025-03-0{3 + rng.randint(0, 2)}", "start": f"{h:02d}:00",
                                   "end": f"{h:02d}:{rng.choice(['30', '45'])}", "attendees": []}
        return {"today": "2025-03-03", "events": events}


class Bank(Env):
    """A bank and brokerage account.

    Config: {"accounts": {"chk": {"name": "checking", "balance": 1500.0}, ...},
             "prices": {"ACME": 12.5, ...}, "holdings": {"ACME": 10}, "payees": ["City Power", ...]}.
    State: accounts, prices, holdings, payees, orders, transactions (list), next_id.
    Orders must quote the current price (from get_quote) and fill at once; cancel_order reverses one.
    """

    def __init__(self, config: dict):
        super().__init__(config)
        self.accounts = copy.deepcopy(config.get("accounts", {}))
        self.prices = dict(config.get("prices", {}))
        self.holdings = dict(config.get("holdings", {}))
        self.payees = list(config.get("payees", []))
        self.orders = copy.deepcopy(config.get("orders", {}))
        self.transactions = copy.deepcopy(config.get("transactions", []))
        self.next_id = int(config.get("next_id", 100))

    def _log(self, account, amount, memo):
        self.next_id += 1
        tid = f"t{self.next_id}"
        self.accounts[account]["balance"] = round(self.accounts[account]["balance"] + amount, 2)
        self.transactions.append({"id": tid, "account": account, "amount": round(amount, 2), "memo": memo})
        return tid

    @read_only
    def list_accounts(self) -> dict:
        """All accounts with their balances.
        Returns: {"accounts": [{"id", "name", "balance"}]}."""
        return {"accounts": [{"id": i, **a} for i, a in sorted(self.accounts.items())]}

    @read_only
    def get_balance(self, account_id: str) -> dict:
        """Balance of one account.
        Args:
            account_id: id from list_accounts.
        Returns: {"account_id", "balance"}. Fails if the id is unknown."""
        if account_id not in self.accounts:
            return _err(f"unknown account: {account_id}")
        return {"account_id": account_id, "balance": self.accounts[account_id]["balance"]}

    def transfer(self, from_account: str, to_account: str, amount: float) -> dict:
        """Move money between two own accounts.
        Args:
            from_account: account to debit.
            to_account: account to credit.
            amount: positive amount.
        Returns: {"transaction_id", "from_balance"}. Fails on unknown or equal accounts, amount <= 0, or insufficient
            funds."""
        if from_account not in self.accounts or to_account not in self.accounts or from_account == to_account:
            return _err("need two different known accounts")
        if not amount > 0 or amount > self.accounts[from_account]["balance"]:
            return _err(f"invalid amount {amount}: balance is {self.accounts[from_account]['balance']}")
        tid = self._log(from_account, -amount, f"transfer to {to_account}")
        self._log(to_account, amount, f"transfer from {from_account}")
        return {"transaction_id": tid, "from_balance": self.accounts[from_account]["balance"]}

    def pay_bill(self, account_id: str, payee: str, amount: float) -> dict:
        """Pay a registered payee.
        Args:
            account_id: account to debit.
            payee: a registered payee name (exact).
            amount: positive amount.
        Returns: {"transaction_id", "balance"}. Fails on unknown account or payee, amount <= 0, or insufficient
            funds."""
        if account_id not in self.accounts or payee not in self.payees:
            return _err(f"unknown account or payee; payees are {self.payees}")
        if not amount > 0 or amount > self.accounts[account_id]["balance"]:
            return _err(f"invalid amount {amount}: balance is {self.accounts[account_id]['balance']}")
        tid = self._log(account_id, -amount, f"bill {payee}")
        return {"transaction_id": tid, "balance": self.accounts[account_id]["balance"]}

    @read_only
    def list_transactions(self, account_id: str, limit: int = 5) -> dict:
        """The most recent transactions of an account, newest first.
        Args:
            account_id: the account.
            limit: how many (1-50).
        Returns: {"transactions": [{"id", "amount", "memo"}]}. Fails if the account is unknown."""
        if account_id not in self.accounts or not 1 <= limit <= 50:
            return _err("unknown account or limit outside 1-50")
        ts = [{"id": t["id"], "amount": t["amount"], "memo": t["memo"]}
              for t in self.transactions if t["account"] == account_id]
        return {"transactions": ts[::-1][:limit]}

    @read_only
    def get_quote(self, symbol: str) -> dict:
        """Current price of a stock.
        Args:
            symbol: ticker symbol, e.g. 'ACME'.
        Returns: {"symbol", "price"}. Fails if the symbol is unknown."""
        if symbol not in self.prices:
            return _err(f"unknown symbol: {symbol}")
        return {"symbol": symbol, "price": self.prices[symbol]}

    def place_order(self, account_id: str, symbol: str, side: typing.Literal["buy", "sell"], shares: int,
                    price: float) -> dict:
        """Buy or sell shares at the current quoted price; the order fills immediately.
        Args:
            account_id: account paying for buys / receiving the proceeds of sells.
            symbol: ticker symbol.
            side: 'buy' or 'sell'.
            shares: number of shares, positive.
            price: the current price from get_quote (must match exactly).
        Returns: {"order_id", "status": "filled", "total"}. Fails on unknown account/symbol, a stale price, shares <=
            0, insufficient funds or shares."""
        if account_id not in self.accounts or symbol not in self.prices:
            return _err("unknown account or symbol")
        if price != self.prices[symbol]:
            return _err(f"price {price} does not match the current quote of {symbol}; call get_quote")
        total = round(shares * price, 2)
        if shares <= 0:
            return _err("shares must be positive")
        if side == "buy" and total > self.accounts[account_id]["balance"]:
            return _err(f"insufficient funds: need {total}, balance {self.accounts[account_id]['balance']}")
        if side == "sell" and shares > self.holdings.get(symbol, 0):
            return _err(f"only {self.holdings.get(symbol, 0)} shares of {symbol} held")
        sign = 1 if side == "buy" else -1
        self.holdings[symbol] = self.holdings.get(symbol, 0) + sign * shares
        self._log(account_id, -sign * total, f"{side} {shares} {symbol}")
        oid = f"o{self.next_id}"
        self.orders[oid] = {"account": account_id, "symbol": symbol, "side": side, "shares": shares,
                            "price": price, "status": "filled"}
        return {"order_id": oid, "status": "filled", "total": total}

    @read_only
    def get_order(self, order_id: str) -> dict:
        """Details of an order.
        Args:
            order_id: id from place_order.
        Returns: {"id", "account", "symbol", "side", "shares", "price", "status"}. Fails if the id is unknown."""
        if order_id not in self.orders:
            return _err(f"unknown order: {order_id}")
        return {"id": order_id, **self.orders[order_id]}

    def cancel_order(self, order_id: str) -> dict:
        """Reverse a filled order at its original price.
        Args:
            order_id: id from place_order.
        Returns: {"order_id", "status": "cancelled"}. Fails if unknown, already cancelled, or the reversal is
            impossible (shares sold since, or funds spent)."""
        o = self.orders.get(order_id)
        if o is None or o["status"] != "filled":
            return _err(f"no filled order {order_id}")
        total = round(o["shares"] * o["price"], 2)
        sign = 1 if o["side"] == "buy" else -1
        if sign > 0 and self.holdings.get(o["symbol"], 0) < o["shares"]:
            return _err("the bought shares are no longer held")
        if sign < 0 and self.accounts[o["account"]]["balance"] < total:
            return _err("the proceeds are no longer in the account")
        self.holdings[o["symbol"]] -= sign * o["shares"]
        self._log(o["account"], sign * total, f"cancel {order_id}")
        o["status"] = "cancelled"
        return {"order_id": order_id, "status": "cancelled"}

    @read_only
    def list_holdings(self) -> dict:
        """Shares held per symbol.
        Returns: {"holdings": {symbol: shares}} (symbols with 0 shares omitted)."""
        return {"holdings": {s: n for s, n in sorted(self.holdings.items()) if n}}

    @staticmethod
    def _sample(rng):
        prices = {s: round(rng.uniform(5, 300), 2) for s in ["ACME", "GLOBX", "INIT", "NOVA"]}
        return {"accounts": {"chk": {"name": "checking", "balance": float(rng.randint(500, 5000))},
                             "sav": {"name": "savings", "balance": float(rng.randint(1000, 20000))}},
                "prices": prices, "holdings": {"ACME": rng.randint(0, 20)}, "payees": ["City Power", "Water Co"]}


class Travel(Env):
    """Flight and hotel booking against a budget.

    Config: {"budget": 2000.0, "airports": {"San Francisco": "SFO", ...},
             "flights": {"FL100": {"origin": "SFO", "destination": "JFK", "date": "2025-05-01", "price": 320.0, "seats": 3}},
             "hotels": {"H1": {"city": "New York", "name": "Harbor Inn", "price": 150.0, "rooms": 2}}, "seed": 0}.
    State: budget (what is left), airports, flights, hotels, bookings. Booking ids come from the seeded rng.
    """

    def __init__(self, config: dict):
        super().__init__(config)
        self.budget = float(config.get("budget", 2000.0))
        self.airports = dict(config.get("airports", {}))
        self.flights = copy.deepcopy(config.get("flights", {}))
        self.hotels = copy.deepcopy(config.get("hotels", {}))
        self.bookings = copy.deepcopy(config.get("bookings", {}))

    def _book(self, kind, item, who, cost, **extra):
        if cost > self.budget:
            return _err(f"cost {cost} exceeds the remaining budget {self.budget}")
        bid = f"BK{self._rng.randint(10000, 99999)}"
        while bid in self.bookings:
            bid = f"BK{self._rng.randint(10000, 99999)}"
        self.budget = round(self.budget - cost, 2)
        self.bookings[bid] = {"kind": kind, "item": item, "name": who, "cost": cost, **extra}
        return {"booking_id": bid, "cost": cost, "budget_left": self.budget}

    @read_only
    def airport_code(self, city: str) -> dict:
        """The airport code of a city.
        Args:
            city: city name, e.g. 'San Francisco'.
        Returns: {"city", "code"}. Fails if the city is unknown."""
        for c, code in self.airports.items():
            if c.lower() == city.lower():
                return {"city": c, "code": code}
        return _err(f"unknown city: {city}")

    @read_only
    def search_flights(self, origin: str, destination: str, date: str) -> dict:
        """Flights between two airports on a day, cheapest first.
        Args:
            origin: departure airport code (from airport_code).
            destination: arrival airport code.
            date: 'YYYY-MM-DD'.
        Returns: {"flights": [{"id", "price", "seats"}]} (possibly empty). Fails on a malformed date."""
        if _date(date) is None:
            return _err(f"malformed date {date!r}; use YYYY-MM-DD")
        fl = [{"id": i, "price": f["price"], "seats": f["seats"]} for i, f in sorted(self.flights.items())
              if f["origin"] == origin and f["destination"] == destination and f["date"] == date]
        return {"flights": sorted(fl, key=lambda f: (f["price"], f["id"]))}

    @read_only
    def get_flight(self, flight_id: str) -> dict:
        """Details of a flight.
        Args:
            flight_id: id from search_flights.
        Returns: {"id", "origin", "destination", "date", "price", "seats"}. Fails if the id is unknown."""
        if flight_id not in self.flights:
            return _err(f"unknown flight: {flight_id}")
        return {"id": flight_id, **self.flights[flight_id]}

    def book_flight(self, flight_id: str, passenger: str) -> dict:
        """Book one seat on a flight.
        Args:
            flight_id: id from search_flights.
            passenger: the traveller's full name.
        Returns: {"booking_id", "cost", "budget_left"}. Fails if unknown, sold out, or over budget."""
        f = self.flights.get(flight_id)
        if f is None or f["seats"] < 1:
            return _err(f"unknown or sold-out flight: {flight_id}")
        out = self._book("flight", flight_id, passenger, f["price"])
        if "error" not in out:
            f["seats"] -= 1
        return out

    @read_only
    def search_hotels(self, city: str, max_price: float | None = None) -> dict:
        """Hotels with free rooms in a city, cheapest first.
        Args:
            city: city name.
            max_price: highest price per night, optional.
        Returns: {"hotels": [{"id", "name", "price"}]} (possibly empty)."""
        hs = [{"id": i, "name": h["name"], "price": h["price"]} for i, h in sorted(self.hotels.items())
              if h["city"].lower() == city.lower() and h["rooms"] > 0 and (max_price is None or h["price"] <= max_price)]
        return {"hotels": sorted(hs, key=lambda h: (h["price"], h["id"]))}

    def book_hotel(self, hotel_id: str, guest: str, nights: int) -> dict:
        """Book one room.
        Args:
            hotel_id: id from search_hotels.
            guest: the guest's full name.
            nights: number of nights (1-30).
        Returns: {"booking_id", "cost", "budget_left"}. Fails if unknown, full, nights outside 1-30, or over
            budget."""
        h = self.hotels.get(hotel_id)
        if h is None or h["rooms"] < 1 or not 1 <= nights <= 30:
            return _err(f"unknown or full hotel {hotel_id}, or nights outside 1-30")
        out = self._book("hotel", hotel_id, guest, round(h["price"] * nights, 2), nights=nights)
        if "error" not in out:
            h["rooms"] -= 1
        return out

    def cancel_booking(self, booking_id: str) -> dict:
        """Cancel a booking; its cost goes back to the budget.
        Args:
            booking_id: id from book_flight or book_hotel.
        Returns: {"cancelled": booking_id, "refund", "budget_left"}. Fails if the id is unknown."""
        b = self.bookings.pop(booking_id, None)
        if b is None:
            return _err(f"unknown booking: {booking_id}")
        table = self.flights if b["kind"] == "flight" else self.hotels
        if b["item"] in table:
            table[b["item"]]["seats" if b["kind"] == "flight" else "rooms"] += 1
        self.budget = round(self.budget + b["cost"], 2)
        return {"cancelled": booking_id, "refund": b["cost"], "budget_left": self.budget}

    @read_only
    def get_booking(self, booking_id: str) -> dict:
        """Details of a booking.
        Args:
            booking_id: the booking id.
        Returns: {"id", "kind", "item", "name", "cost", ...}. Fails if the id is unknown."""
        if booking_id not in self.bookings:
            return _err(f"unknown booking: {booking_id}")
        return {"id": booking_id, **self.bookings[booking_id]}

    @read_only
    def list_bookings(self) -> dict:
        """All bookings.
        Returns: {"bookings": [{"id", "kind", "item", "cost"}], "budget_left"}."""
        return {"bookings": [{"id": i, "kind": b["kind"], "item": b["item"], "cost": b["cost"]}
                             for i, b in sorted(self.bookings.items())], "budget_left": self.budget}

    def set_budget(self, amount: float) -> dict:
        """Set the remaining travel budget.
        Args:
            amount: the new budget, >= 0.
        Returns: {"budget": amount}. Fails on a negative amount."""
        if amount < 0:
            return _err("the budget cannot be negative")
        self.budget = float(amount)
        return {"budget": self.budget}

    @staticmethod
    def _sample(rng):
        airports = {"San Francisco": "SFO", "New York": "JFK", "Chicago": "ORD", "Boston": "BOS"}
        codes, flights = list(airports.values()), {}
        for i in range(6):
            o, d = rng.sample(codes, 2)
            flights[f"FL{100 + i}"] = {"origin": o, "destination": d, "date": f"2025-05-0{rng.randint(1, 3)}",
                                       "price": float(rng.randint(90, 600)), "seats": rng.randint(0, 4)}
        hotels = {f"H{i + 1}": {"city": c, "name": f"{n} Inn", "price": float(rng.randint(80, 300)), "rooms": rng.randint(0, 3)}
                  for i, (c, n) in enumerate(zip(rng.sample(list(airports), 3), ["Harbor", "Maple", "Grand"]))}
        return {"budget": float(rng.randint(800, 3000)), "airports": airports, "flights": flights,
                "hotels": hotels, "seed": rng.randint(0, 10**6)}


class Home(Env):
    """A smart home: lights (on, level), plugs (on), thermostats (on, celsius) and locks (locked).

    Config: {"pin": "1234", "devices": {"d1": {"name": "kitchen light", "room": "kitchen", "kind": "light",
             "on": False, "level": 100}, "t1": {..."kind": "thermostat", "on": True, "celsius": 20.0},
             "k1": {..."kind": "lock", "locked": True}, "p1": {..."kind": "plug", "on": False}}, "scenes": {}}.
    State: pin, devices, scenes ({name: {device_id: settings}}).
    """

    def __init__(self, config: dict):
        super().__init__(config)
        self.pin = str(config.get("pin", "0000"))
        self.devices = copy.deepcopy(config.get("devices", {}))
        self.scenes = copy.deepcopy(config.get("scenes", {}))

    def _get(self, device_id, kinds):
        d = self.devices.get(device_id)
        if d is None:
            return None, _err(f"unknown device: {device_id}")
        if d["kind"] not in kinds:
            return None, _err(f"{device_id} is a {d['kind']}; this needs a {' or '.join(kinds)}")
        return d, None

    @read_only
    def list_devices(self, room: str | None = None) -> dict:
        """Devices, optionally in one room.
        Args:
            room: room name, optional.
        Returns: {"devices": [{"id", "name", "room", "kind"}]}."""
        return {"devices": [{"id": i, "name": d["name"], "room": d["room"], "kind": d["kind"]}
                            for i, d in sorted(self.devices.items()) if room is None or d["room"] == room]}

    @read_only
    def get_device(self, device_id: str) -> dict:
        """Full status of a device.
        Args:
            device_id: id from list_devices.
        Returns: {"id", "name", "room", "kind", ...status}. Fails if the id is unknown."""
        if device_id not in self.devices:
            return _err(f"unknown device: {device_id}")
        return {"id": device_id, **self.devices[device_id]}

    def turn_on(self, device_id: str) -> dict:
        """Switch on a light, plug or thermostat.
        Args:
            device_id: the device.
        Returns: {"id", "on": true}. Fails if unknown or not switchable."""
        d, e = self._get(device_id, ("light", "plug", "thermostat"))
        if e:
            return e
        d["on"] = True
        return {"id": device_id, "on": True}

    def turn_off(self, device_id: str) -> dict:
        """Switch off a light, plug or thermostat.
        Args:
            device_id: the device.
        Returns: {"id", "on": false}. Fails if unknown or not switchable."""
        d, e = self._get(device_id, ("light", "plug", "thermostat"))
        if e:
            return e
        d["on"] = False
        return {"id": device_id, "on": False}

    def set_brightness(self, device_id: str, level: int) -> dict:
        """Set a light's brightness (also switches it on).
        Args:
            device_id: a light.
            level: brightness in percent, 1-100.
        Returns: {"id", "level"}. Fails if not a light or the level is out of range."""
        d, e = self._get(device_id, ("light",))
        if e:
            return e
        if not 1 <= level <= 100:
            return _err("level must be 1-100")
        d.update(on=True, level=level)
        return {"id": device_id, "level": level}

    def set_temperature(self, device_id: str, celsius: float) -> dict:
        """Set a thermostat's target temperature.
        Args:
            device_id: a thermostat.
            celsius: target in degrees Celsius, 5-35 (convert Fahrenheit first).
        Returns: {"id", "celsius"}. Fails if not a thermostat or out of range."""
        d, e = self._get(device_id, ("thermostat",))
        if e:
            return e
        if not 5 <= celsius <= 35:
            return _err("celsius must be 5-35")
        d["celsius"] = float(celsius)
        return {"id": device_id, "celsius": d["celsius"]}

    def lock(self, device_id: str) -> dict:
        """Lock a door lock.
        Args:
            device_id: a lock.
        Returns: {"id", "locked": true}. Fails if not a lock."""
        d, e = self._get(device_id, ("lock",))
        if e:
            return e
        d["locked"] = True
        return {"id": device_id, "locked": True}

    def unlock(self, device_id: str, pin: str) -> dict:
        """Unlock a door lock with the home PIN.
        Args:
            device_id: a lock.
            pin: the home PIN code.
        Returns: {"id", "locked": false}. Fails if not a lock or the PIN is wrong."""
        d, e = self._get(device_id, ("lock",))
        if e:
            return e
        if pin != self.pin:
            return _err("wrong PIN")
        d["locked"] = False
        return {"id": device_id, "locked": False}

    def create_scene(self, name: str, device_ids: list[str]) -> dict:
        """Save the current settings of some devices as a named scene.
        Args:
            name: scene name (new).
            device_ids: the devices to include.
        Returns: {"scene", "devices": count}. Fails if the name exists, the list is empty, or a device is unknown."""
        if not name or name in self.scenes or not device_ids:
            return _err("need a new scene name and at least one device")
        bad = [i for i in device_ids if i not in self.devices]
        if bad:
            return _err(f"unknown devices: {bad}")
        self.scenes[name] = {i: {k: v for k, v in self.devices[i].items() if k in ("on", "level", "celsius", "locked")}
                             for i in device_ids}
        return {"scene": name, "devices": len(self.scenes[name])}

    def activate_scene(self, name: str) -> dict:
        """Apply a saved scene to its devices.
        Args:
            name: scene name.
        Returns: {"scene", "devices": ids changed}. Fails if the scene is unknown."""
        if name not in self.scenes:
            return _err(f"unknown scene: {name}; scenes are {sorted(self.scenes)}")
        for i, settings in self.scenes[name].items():
            if i in self.devices:
                self.devices[i].update(settings)
        return {"scene": name, "devices": sorted(self.scenes[name])}

    @staticmethod
    def _sample(rng):
        devs = {"d1": {"name": "kitchen light", "room": "kitchen", "kind": "light", "on": False, "level": 100},
                "d2": {"name": "desk lamp", "room": "office", "kind": "light", "on": True, "level": rng.randint(10, 90)},
                "p1": {"name": "coffee maker", "room": "kitchen", "kind": "plug", "on": False},
                "t1": {"name": "hall thermostat", "room": "hall", "kind": "thermostat", "on": True,
                       "celsius": float(rng.randint(17, 23))},
                "k1": {"name": "front door", "room": "hall", "kind": "lock", "locked": True}}
        return {"pin": f"{rng.randint(0, 9999):04d}", "devices": devs, "scenes": {}}


class MathTools(Env):
    """Stateless arithmetic, statistics, unit and date helpers. Config: {} (nothing). No state."""

    _UNITS = {"km": ("length", 1000.0), "m": ("length", 1.0), "cm": ("length", 0.01), "mile": ("length", 1609.344),
              "ft": ("length", 0.3048), "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237),
              "l": ("volume", 1.0), "ml": ("volume", 0.001), "gallon": ("volume", 3.785411784)}

    def _num(self, x):
        # round away float noise so results are stable strings (the response check compares text)
        return {"result": round(x, 6)} if math.isfinite(x) else _err("result is not a finite number")

    @read_only
    def add(self, a: float, b: float) -> dict:
        """a + b.
        Args:
            a: first number.
            b: second number.
        Returns: {"result": number}."""
        return self._num(a + b)

    @read_only
    def subtract(self, a: float, b: float) -> dict:
        """a - b.
        Args:
            a: number to subtract from.
            b: number to subtract.
        Returns: {"result": number}."""
        return self._num(a - b)

    @read_only
    def multiply(self, a: float, b: float) -> dict:
        """a * b.
        Args:
            a: first factor.
            b: second factor.
        Returns: {"result": number}. Fails if the result is not finite."""
        return self._num(a * b)

    @read_only
    def divide(self, a: float, b: float) -> dict:
        """a / b.
        Args:
            a: numerator.
            b: denominator, non-zero.
        Returns: {"result": number}. Fails when b is 0."""
        return _err("division by zero") if b == 0 else self._num(a / b)

    @read_only
    def power(self, base: float, exponent: float) -> dict:
        """base ** exponent.
        Args:
            base: the base.
            exponent: the exponent (|exponent| <= 100).
        Returns: {"result": number}. Fails on complex or non-finite results or a too large exponent."""
        if abs(exponent) > 100 or (base < 0 and exponent != int(exponent)) or (base == 0 and exponent < 0):
            return _err("exponent too large, or the result is complex/undefined")
        try:
            return self._num(float(base) ** exponent)
        except OverflowError:
            return _err("result too large")

    @read_only
    def sqrt(self, x: float) -> dict:
        """Square root.
        Args:
            x: a number >= 0.
        Returns: {"result": number}. Fails for negative x."""
        return _err("square root of a negative number") if x < 0 else self._num(math.sqrt(x))

    @read_only
    def mean(self, numbers: list[float]) -> dict:
        """Arithmetic mean.
        Args:
            numbers: a non-empty list of numbers.
        Returns: {"result": number}. Fails on an empty list."""
        return _err("empty list") if not numbers else self._num(sum(numbers) / len(numbers))

    @read_only
    def round_number(self, x: float, digits: int = 2) -> dict:
        """Round to a number of decimal places.
        Args:
            x: the number.
            digits: decimal places, 0-10.
        Returns: {"result": number}. Fails if digits is outside 0-10."""
        return _err("digits must be 0-10") if not 0 <= digits <= 10 else self._num(round(x, digits))

    @read_only
    def percentage(self, part: float, whole: float) -> dict:
        """What percent part is of whole.
        Args:
            part: the part.
            whole: the whole, non-zero.
        Returns: {"result": percent}. Fails when whole is 0."""
        return _err("whole is zero") if whole == 0 else self._num(100.0 * part / whole)

    @read_only
    def convert_units(self, value: float, from_unit: str, to_unit: str) -> dict:
        """Convert length (km, m, cm, mile, ft), mass (kg, g, lb), volume (l, ml, gallon) or temperature (C, F).
        Args:
            value: the amount.
            from_unit: unit of value.
            to_unit: wanted unit (same kind).
        Returns: {"result": converted value}. Fails on unknown units or different kinds."""
        if (from_unit, to_unit) in (("C", "F"), ("F", "C"), ("C", "C"), ("F", "F")):
            c = value if from_unit == "C" else (value - 32) / 1.8
            return self._num(c if to_unit == "C" else c * 1.8 + 32)
        a, b = self._UNITS.get(from_unit), self._UNITS.get(to_unit)
        if a is None or b is None or a[0] != b[0]:
            return _err(f"cannot convert {from_unit} to {to_unit}; known units: {sorted(self._UNITS)} C F")
        return self._num(value * a[1] / b[1])

    @read_only
    def add_days(self, date: str, days: int) -> dict:
        """The date a number of days after (or before, if negative) a date.
        Args:
            date: 'YYYY-MM-DD'.
            days: days to add, may be negative.
        Returns: {"date": 'YYYY-MM-DD'}. Fails on a malformed date or out-of-range result."""
        d = _date(date)
        if d is None:
            return _err(f"malformed date {date!r}; use YYYY-MM-DD")
        try:
            return {"date": (d + datetime.timedelta(days=days)).isoformat()}
        except OverflowError:
            return _err("date out of range")

    @read_only
    def days_between(self, start: str, end: str) -> dict:
        """Days from one date to another.
        Args:
            start: 'YYYY-MM-DD'.
            end: 'YYYY-MM-DD'.
        Returns: {"days": int, negative if end is before start}. Fails on malformed dates."""
        a, b = _date(start), _date(end)
        if a is None or b is None:
            return _err("malformed date; use YYYY-MM-DD")
        return {"days": (b - a).days}

    @staticmethod
    def _sample(rng):
        return {}


ENVS = {"files": FileSystem, "messages": Messaging, "calendar": Calendar, "bank": Bank, "travel": Travel,
        "home": Home, "math": MathTools}


def default_config(name: str, rng: random.Random | None = None) -> dict:
    """A small random config for env `name` (gen_data.py builds its tasks on these)."""
    return ENVS[name]._sample(rng or random.Random(0))


# ----------------------------------------------------------------------------------------------
# Schemas from signatures + docstrings

def _tool_functions(cls) -> dict:
    """name -> function for the tools of an env class: public functions defined on the class."""
    return {n: f for n, f in vars(cls).items() if inspect.isfunction(f) and not n.startswith("_")}


def _json_type(tp) -> dict:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return {"type": "string", "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _json_type(rest[0])
    if origin is list:
        return {"type": "array", "items": _json_type(args[0])} if args else {"type": "array"}
    simple = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}
    return {"type": simple[tp]}


def _parse_doc(doc: str):
    """Google-style docstring -> (description, {arg: text}, returns text)."""
    lines = inspect.cleandoc(doc or "").split("\n")
    desc, args, ret, section, cur = [], {}, [], "desc", None
    for ln in lines:
        s = ln.strip()
        if s.startswith(("Args:", "Returns:")):  # "Returns: text" may share the header's line
            section, s = s.split(":")[0].lower(), s.split(":", 1)[1].strip()
            if not s:
                continue
        if section == "desc" and s:
            desc.append(s)
        elif section == "args" and s:
            m = re.match(r"(\w+):\s*(.*)", s)
            if m and ln.startswith(" " * 4) and not ln.startswith(" " * 8):
                cur = m.group(1)
                args[cur] = m.group(2)
            elif cur:
                args[cur] += " " + s
        elif section == "returns" and s:
            ret.append(s)
    return " ".join(desc), args, " ".join(ret)


def schema(fn) -> dict:
    """OpenAI-style tool schema of a tool function, from its type hints and docstring."""
    desc, arg_docs, ret = _parse_doc(fn.__doc__)
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for p in list(inspect.signature(fn).parameters.values())[1:]:  # skip self
        if p.name not in arg_docs:  # our own code: fail loudly at import
            raise ValueError(f"{fn.__qualname__}: argument {p.name} has no docstring entry")
        props[p.name] = {**_json_type(hints[p.name]), "description": arg_docs[p.name]}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        elif p.default is not None:
            props[p.name]["default"] = p.default
    return {"type": "function", "function": {
        "name": fn.__name__, "description": desc + (f" Returns: {ret}" if ret else ""),
        "parameters": {"type": "object", "properties": props, "required": required}}}


SCHEMAS, OWNER, READ_ONLY = {}, {}, set()  # over all ENVS; tool names are unique across envs
for _env_name, _cls in ENVS.items():
    for _n, _f in _tool_functions(_cls).items():
        assert _n not in OWNER, f"tool name {_n} used by two envs"
        SCHEMAS[_n], OWNER[_n] = schema(_f), _env_name
        if getattr(_f, "read_only", False):
            READ_ONLY.add(_n)


def tool_schemas(env_names, exclude=()) -> list:
    """Schemas of all tools of the given envs (in definition order), minus the names in exclude."""
    return [SCHEMAS[n] for e in env_names for n in _tool_functions(ENVS[e]) if n not in exclude]


def is_read_only(name: str) -> bool:
    return name in READ_ONLY


def tools_text(schemas) -> str:
    """Schemas as <tools> JSON lines, for places where they must be written in text (miss_func turns)."""
    return "<tools>\n" + "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas) + "\n</tools>"


# ----------------------------------------------------------------------------------------------
# The assistant message protocol

@dataclass
class Parsed:
    summary: str | None = None
    plan: str | None = None
    calls: list = field(default_factory=list)
    content: str = ""
    errors: list = field(default_factory=list)  # tool_call problems start with "tool_call"
    tags: list = field(default_factory=list)    # order of parts: "summary", "plan", "tool_call", "text"


_OPEN_RE = re.compile(r"<(summary|plan|tool_call)>")
_STRAY_RE = re.compile(r"</?(summary|plan|tool_call)>")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _parse_call_json(body: str):
    """One <tool_call> body -> (call, None) or (None, error text)."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        return None, f"tool_call: invalid JSON ({str(e)[:80]})"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None, 'tool_call: expected {"name": "<function>", "arguments": {...}}'
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some chat templates double-encode the arguments
        try:
            args = json.loads(args, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return None, f"tool_call {obj['name']}: arguments is not a JSON object"
    if not isinstance(args, dict):
        return None, f"tool_call {obj['name']}: arguments must be a JSON object"
    return {"name": obj["name"], "arguments": args}, None


def parse_message(text) -> Parsed:
    """Parse an assistant message into summary, plan, calls, free text and format errors. Never raises."""
    p = Parsed()
    if not isinstance(text, str):
        p.errors.append("message is not text")
        return p
    rest, pos, start = [], 0, 0
    while True:  # str.find instead of one backtracking regex: linear-ish on long, unclosed outputs
        m = _OPEN_RE.search(text, start)
        if m is None:
            break
        tag = m.group(1)
        end = text.find(f"</{tag}>", m.end())
        if end < 0:  # unclosed: it stays in the content and is reported as stray below
            start = m.end()
            continue
        if text[pos:m.start()].strip():
            p.tags.append("text")
        rest.append(text[pos:m.start()])
        body, pos = text[m.end():end], end + len(tag) + 3
        start = pos
        p.tags.append(tag)
        if tag == "tool_call":
            call, err = _parse_call_json(body.strip())
            if err:
                p.errors.append(err)
            else:
                p.calls.append(call)
        elif getattr(p, tag) is not None:
            p.errors.append(f"more than one <{tag}>")
        else:  # a tag inside a summary or plan (a call written into the plan, a nested summary) is an error
            p.errors += [f"<{inner}> tag inside <{tag}>" for inner in dict.fromkeys(_STRAY_RE.findall(body))]
            setattr(p, tag, body.strip())
    if text[pos:].strip():
        p.tags.append("text")
    rest.append(text[pos:])
    content = "".join(rest)
    for stray in _STRAY_RE.findall(content):  # an unclosed <tool_call> is a broken call, not chat
        p.errors.append(f"tool_call: unclosed or stray <{stray}> tag" if stray == "tool_call"
                        else f"unclosed or stray <{stray}> tag")
    p.content = content.strip()
    return p


def render_message(summary, plan, calls, content="") -> str:
    """Inverse of parse_message: summary, plan, content, then one <tool_call> per call."""
    parts = []
    if summary is not None:
        parts.append(f"<summary>{summary}</summary>")
    if plan is not None:
        parts.append(f"<plan>{plan}</plan>")
    if content:
        parts.append(content)
    for c in calls:  # "<\/" is JSON for "</": no argument text can close the tag early
        body = json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
        parts.append(f"<tool_call>{body.replace('</', '<' + chr(92) + '/')}</tool_call>")
    return "\n".join(parts)


def format_ok(parsed: Parsed, pa: bool) -> bool:
    """Does the message follow the output format? pa: summary first; calls need <plan> before them;
    a final reply is summary + text. No pa: no summary/plan at all. Always: no parse errors, and nothing
    but further calls after the first call."""
    t = parsed.tags
    if parsed.errors or not t:
        return False
    if "tool_call" in t and any(x != "tool_call" for x in t[t.index("tool_call"):]):
        return False
    calls = "tool_call" in t
    if pa:
        head = ["summary", "plan"] if calls else ["summary", "text"]
        return t[:2] == head and (calls or len(t) == 2)
    return "summary" not in t and "plan" not in t and (calls or t == ["text"])


# ----------------------------------------------------------------------------------------------
# BFCL python-list format, via ast (never eval)

def _literal(node):
    """A literal argument as a JSON value (tuples -> lists); sets, bytes, nan etc. are rejected."""
    return json.loads(json.dumps(ast.literal_eval(node), allow_nan=False))


def parse_python_calls(text, signatures=None):
    """'[f(a=1), g(b="x")]' -> (calls, errors). Never raises.

    Arguments must be literals. Positional arguments are errors, unless `signatures` (name -> list of
    parameter names) is given, which maps them to keywords (BFCL's ground truth uses a few).
    """
    if not isinstance(text, str):
        return [], ["not text"]
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return [], [f"not a python list of calls: {type(e).__name__}"]
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls, errors = [], []
    for node in nodes:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            errors.append("each element must be a call like f(a=1)")
            continue
        name, args = node.func.id, {}
        try:
            if node.args:
                params = (signatures or {}).get(name)
                if params is None or len(node.args) > len(params):
                    raise ValueError(f"{name}: positional arguments are not allowed; use keywords")
                args.update({params[i]: _literal(a) for i, a in enumerate(node.args)})
            for kw in node.keywords:
                if kw.arg is None:
                    raise ValueError(f"{name}: **kwargs not allowed")
                args[kw.arg] = _literal(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as e:
            errors.append(f"{name}: arguments must be literals ({str(e)[:80]})")
            continue
        calls.append({"name": name, "arguments": args})
    return calls, errors


def render_python_call(call) -> str:
    return f"{call['name']}(" + ", ".join(f"{k}={v!r}" for k, v in call["arguments"].items()) + ")"


def render_python_calls(calls) -> str:
    """[{"name": "f", "arguments": {"a": 1}}] -> '[f(a=1)]' (repr of JSON values is a python literal)."""
    return "[" + ", ".join(render_python_call(c) for c in calls) + "]"


# ----------------------------------------------------------------------------------------------
# Validation and execution

_PY_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
             "object": dict, "null": type(None)}


def _type_error(value, spec, where):
    t = spec.get("type")
    types = t if isinstance(t, list) else [t] if t else []
    if types and not any(isinstance(value, _PY_TYPES.get(x, object)) and not (
            isinstance(value, bool) and x in ("integer", "number")) for x in types):
        got = "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                            list: "array", dict: "object"}.get(type(value), type(value).__name__)
        return f"{where} must be {'/'.join(types)}, got {got}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} must be a finite number"
    if "enum" in spec and value not in spec["enum"]:
        return f"{where} must be one of {spec['enum']}"
    if isinstance(value, list) and "items" in spec:
        for i, v in enumerate(value):
            e = _type_error(v, spec["items"], f"{where}[{i}]")
            if e:
                return e
    if isinstance(value, dict) and "properties" in spec:
        for k, v in value.items():
            if k in spec["properties"]:
                e = _type_error(v, spec["properties"][k], f"{where}.{k}")
                if e:
                    return e
    return None


def validate_call(call, known: dict, offered=None, max_arg_chars: int = 20000, check_types: bool = True):
    """Check a call against the schemas before anything runs. Returns an error text or None.

    known: name -> schema of every function of the task's envs; offered: names the model may use now
    (None = all known). A known but not offered name is a held-out function (miss_func).
    check_types=False skips the type checks (BFCL mode: its executor runs calls as written, and its own
    ground truth disagrees with its docs, e.g. close_ticket(ticket_id='ticket_001') for an integer id).
    """
    name, args = call["name"], call["arguments"]
    if name not in known:
        return f"unknown function '{name[:60]}'"
    if offered is not None and name not in offered:
        return f"function '{name}' is not available"
    if len(json.dumps(args, ensure_ascii=False, default=str)) > max_arg_chars:
        return f"{name}: arguments too long (limit {max_arg_chars} characters)"
    params = known[name]["function"]["parameters"]
    props = params.get("properties", {})
    missing = [r for r in params.get("required", []) if r not in args]
    if missing:
        return f"{name}: missing required argument(s) {missing}"
    unexpected = [k for k in args if k not in props]
    if unexpected:
        return f"{name}: unexpected argument(s) {[k[:40] for k in unexpected][:5]}; expected {sorted(props)}"
    for k, v in args.items():
        e = _type_error(v, props[k], f"{name}: argument '{k}'") if check_types else None
        if e:
            return e
    return None


def _call_key(call) -> str:
    return json.dumps([call["name"], call["arguments"]], sort_keys=True, ensure_ascii=False, default=str)


def tool_message(name, result=None, error=None, max_tool_chars: int = 8000) -> dict:
    """The tool-role message for one call: compact JSON; output over the cap becomes an error with the start."""
    body = {"name": name, "error": error} if error is not None else {"name": name, "result": result}
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str)
    if len(text) > max_tool_chars:
        note = f"output too long ({len(text)} characters, limit {max_tool_chars}); showing the start"
        full, keep = text, max_tool_chars - len(note) - 120
        while True:  # escaping inside "partial" grows the text: shrink until it fits
            text = json.dumps({"name": name[:80], "error": note, "partial": full[:max(0, keep)]},
                              ensure_ascii=False, separators=(",", ":"))
            if len(text) <= max_tool_chars or keep <= 0:
                break
            keep -= len(text) - max_tool_chars
    return {"role": "tool", "content": text}


# ----------------------------------------------------------------------------------------------
# Checker (BFCL semantics)

def check_turn(envs, ref_envs, gt_results, model_results, turn_type="normal", state_changing_calls=0):
    """One user turn -> (passed, reason).

    State check: every public attribute of every env equals the reference env's (driven by the ground
    truth up to and including this turn). Response check: gt_results (this turn's gt execution results)
    appear as a multiset among model_results (the model's execution results in the episode so far).
    A miss_param/miss_func turn must also have no state-changing call by the model.
    """
    for name, ref in ref_envs.items():
        a, b = envs[name]._state(), ref._state()
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            return False, f"state mismatch in {name}: {diff}"
    left = Counter(model_results)
    for r in gt_results:
        if left[r] <= 0:
            return False, f"missing result: {r[:120]}"
        left[r] -= 1
    if turn_type in ("miss_param", "miss_func") and state_changing_calls:
        return False, "called a state-changing function where it should have asked or refused"
    return True, ""


# ----------------------------------------------------------------------------------------------
# Rewards

def total_reward(parts: dict, weights: dict) -> float:
    """sum_k weights[k] * parts[k]; parts without a weight count 0. Not normalised (GRPO normalises)."""
    unknown = set(weights) - set(parts)
    if unknown:
        raise ValueError(f"weights for unknown reward parts: {sorted(unknown)}")
    return float(sum(w * parts[k] for k, w in weights.items()))


def _scalars(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _scalars(v)
    elif isinstance(x, list):
        for v in x:
            yield from _scalars(v)
    elif isinstance(x, (str, int, float)) and not isinstance(x, bool):
        yield x


def awareness_score(summary, plan, facts, names) -> float:
    """Mean of two fractions: key facts mentioned in the summary (1 if none are needed) and remaining function
    names mentioned in the plan (1 if none remain), names counted with repeats (a plan that names
    get_balance once for two get_balance calls gets half of them). A missing summary/plan (None) scores 0 for
    its half; an empty one is a note with nothing to carry. Matching ignores case and wants whole tokens: the
    fact "e1" is not mentioned by "e10", nor the function "send" by "send_message"."""
    def count(item, text):
        return len(re.findall(r"(?<![\w])" + re.escape(str(item)) + r"(?![\w])", text, re.IGNORECASE))

    def frac(text, items):
        if text is None:
            return 0.0
        want = Counter(items)
        return 1.0 if not items else sum(min(n, count(i, text)) for i, n in want.items()) / len(items)
    return 0.5 * frac(summary, facts) + 0.5 * frac(plan, names)


SYSTEM_PROMPT = """You are a helpful assistant that completes the user's requests by calling functions.
To call a function, write
<tool_call>{"name": "<function name>", "arguments": {<arguments as a JSON object>}}</tool_call>
You may write several <tool_call> blocks in one message; they run in order and each result comes back in a
tool message. Use ids, paths, prices and dates exactly as earlier results gave them.
When the request is done, reply to the user in plain text without any <tool_call>; that ends your turn.
If a required value is missing, ask the user for it instead of guessing. If no available function can do
what is asked, say so instead of calling anything."""

PA_PROMPT = """
Progress awareness: start EVERY message with <summary>...</summary>: what has been done and learned so far
(the ids, values and state the next steps need). A message that calls functions then has <plan>...</plan>:
the remaining steps of the current request, naming the functions, before its <tool_call> blocks.
The final reply of a request is <summary>...</summary> followed by the plain text answer."""


# For a model trained from scratch (gen_data.py --prompt short): it learns the protocol from the examples, so the
# instructions above would only cost it tokens (227 of the 836 of a files+messages example, under its tokenizer).
SHORT_PROMPT = ('Call functions as <tool_call>{"name": ..., "arguments": {...}}</tool_call>; '
                "when the request is done, reply in plain text.")
SHORT_PA_PROMPT = " Begin each message with <summary>...</summary>, then a <plan>...</plan> before calls."


def system_prompt(pa: bool, style: str = "full") -> str:
    """The system message: style "full" (the instructions a pretrained model needs) or "short" (a task's
    "prompt" field, which gen_data.py --prompt writes)."""
    if style == "short":
        return SHORT_PROMPT + (SHORT_PA_PROMPT if pa else "")
    return SYSTEM_PROMPT + (PA_PROMPT if pa else "")


def carry_text(summary, plan, request) -> str:
    """The user message of a new turn in summary context mode: the carried progress + the new request."""
    lines = ["Progress so far:"]
    lines.append(f"<summary>{summary or ''}</summary>")
    if plan:
        lines.append(f"<plan>{plan}</plan>")
    return "\n".join(lines) + "\n\nNew request: " + request


def carry_next(summary, plan, parsed):
    """(summary, plan) a summary-mode turn carries after the parsed message: the last summary and the plan written
    with it (an empty summary is one: nothing to carry); a final reply (summary, no plan) closes the plan."""
    if parsed.summary is None and not parsed.plan:
        return summary, plan
    return (summary if parsed.summary is None else parsed.summary), parsed.plan


# ----------------------------------------------------------------------------------------------
# Progress awareness, causally: what the next assistant message can know. One definition for the PAG data
# (gen_data.py writes it), the awareness reward (Episode.step scores against it) and the control policies.
# It reads only what the assistant has seen: the user turns so far, its own calls and their results so far,
# and the current request. The current request's ground-truth calls stand for what the request asks for (a
# model reads that off the request), with one exception that the request does not tell: the recovery of an
# error (the steps after a turn's expected failing step, spec["fails"]) is unknown until a call has failed.

def has_word(text, s):
    """s occurs in text as a whole value: "m1" is not in "m101", "100" is not in "1500.0" (str.find: no regex)."""
    i = text.find(s)
    while i >= 0:
        a, b = text[i - 1:i] if i else " ", text[i + len(s):i + len(s) + 2] + "  "
        if not (a.isalnum() or a in "._@-") and not (b[0].isalnum() or b[0] in "_@-" or (b[0] == "." and b[1].isdigit())):
            return True
        i = text.find(s, i + 1)
    return False


def _mentions(text, v):
    """has_word, also for a value written into JSON (a tool result) with escapes: a newline as \\n."""
    escaped = json.dumps(v, ensure_ascii=False)[1:-1]
    return has_word(text, v) or (escaped != v and has_word(text, escaped))


def remaining_steps(spec, rec):
    """This turn's ground-truth steps not made yet (a step = the calls of one message), as far as can be known
    now: before any call of the turn has failed, the plan ends at the step expected to fail (spec["fails"]).
    Calls already made and executed, even with an error result, are matched off as a multiset, in order."""
    steps = spec["gt"]
    if spec.get("fails"):   # the recovery is known once a call of the failing step's function has failed
        failing = {c["name"] for c in steps[min(spec["fails"])]}
        if not any(e is not None and c["name"] in failing for c, e in zip(rec["calls"], rec["errors"])):
            steps = steps[:min(spec["fails"]) + 1]
    made = Counter(_call_key(c) for c, ok in zip(rec["calls"], rec["executed"]) if ok)
    out = []
    for step in steps:
        left = []
        for c in step:
            k = _call_key(c)
            if made[k] > 0:
                made[k] -= 1
            else:
                left.append(c)
        if left:
            out.append(left)
    return out


def learned(spec, rec):
    """(key, value) facts a finished request reports: the referents its task declares (spec["learned"]: what
    its intents made or found, e.g. a booking id), those the assistant has seen (in its calls, their results or
    the request)."""
    seen = rec["results"] + [json.dumps(c["arguments"], ensure_ascii=False) for c in rec["calls"]] + [spec["user"]]
    return [(k, v) for k, v in spec.get("learned", []) if any(_mentions(t, v) for t in seen)]


def expected_progress(ep, final=False):
    """What the next message of `ep` can know -> dict(done, failed, facts, steps, known, pending, carried):
    done     names of this turn's calls that succeeded, in order, repeats kept;
    failed   {name: error} for functions whose latest call this turn failed (until a later call succeeds);
    steps    remaining_steps(): the plan, [] when the next message is the final reply;
    facts    [(argument, value)] the remaining steps need that the assistant has in view but the current request
             does not state: from this turn's successful tool results, or carried from earlier turns (below);
    known    the referents learned so far (learned()): every finished request's, and for a final reply (final)
             this one's too, which its summary states. Summary context mode carries only that summary into
             the next turn, so facts are in view in both context modes."""
    ti, rec = len(ep.turns) - 1, ep.turns[-1]
    spec, prev = ep.specs[ti], ep.specs[ti - 1] if ti else {}
    done, failed = [], {}
    for c, err in zip(rec["calls"], rec["errors"]):
        if err is None:
            done.append(c["name"])
            failed.pop(c["name"], None)
        else:
            failed[c["name"]] = err
    # a final summary states the referents learned so far (the next turn has them in view: summary context mode
    # carries exactly that summary). Measured on the default train data: carrying every earlier request's
    # referents, not only the last one's, costs 3.6 more tokens per final summary (17.7 -> 21.3) and puts 6% more
    # of the facts the calls need in view (668 -> 707 of them: "the contact you just added" two requests later).
    known = []  # the referents of every finished request (and of this one, for its final reply), newest last
    for j in range(ti + 1 if final else ti):
        new = learned(ep.specs[j], ep.turns[j])
        known = [kv for kv in known if kv[1] not in {v for _, v in new}] + new
    steps = remaining_steps(spec, rec)
    request = spec["user"] + " " + prev.get("pending", "")
    # in view: this turn's results, and what earlier turns left: in summary context mode the carried summary as the
    # model wrote it (it is all the context holds), else the referents learned (what the reference summaries state)
    carried = [rec["user"]] if ep.context_mode == "summary" and ti else [v for _, v in known]
    in_view = [t for t, e in zip(rec["results"], rec["errors"]) if e is None] + carried
    facts = []
    for step in steps:
        for c in step:
            for k, v in c["arguments"].items():
                for x in _scalars(v):
                    x = str(x)
                    if len(x) >= 2 and x not in {f for _, f in facts} and not has_word(request, x) \
                            and any(_mentions(t, x) for t in in_view):
                        facts.append((k, x))
    return {"done": done, "failed": failed, "facts": facts, "steps": steps, "known": known,
            "pending": spec.get("pending"), "carried": prev.get("pending")}


def progress_note(ep, final=False):
    """(summary, plan) text for the next message of `ep` from expected_progress(). A final reply (final) has no
    plan. Nothing to carry writes an empty summary: no filler."""
    p, spec = expected_progress(ep, final), ep.specs[len(ep.turns) - 1]
    said = [f"Request: {p['carried']}."] if p["carried"] else []
    if final and p["pending"]:
        said.append(f"Pending: {p['pending']}; " + (f"need {spec['need']}." if spec.get("need") else "no function for it yet."))
    said += [f"Done: {', '.join(p['done'])}."] if p["done"] else []
    said += [f"Failed: {'; '.join(f'{n} ({e})' for n, e in p['failed'].items())}."] if p["failed"] else []
    facts = p["known"] if final else p["facts"]
    said += ["Known: " + "; ".join(f"{k}={v}" for k, v in facts) + "."] if facts else []
    plan = None if final else "Next: " + ", then ".join(" and ".join(c["name"] for c in s) for s in p["steps"]) + "."
    return " ".join(said), plan


_VALUE_RE = re.compile(r"[\w./@:-]*\d[\w./@:-]*")


def summary_errors(summary, ep):
    """What a summary written as the next message of `ep` states that is not true (empty list: all true):
    'Done:' names that no call of this turn succeeded with, 'Failed:' names whose latest call did not fail,
    'Known:' values and any other value it states (ids, numbers, dates, paths: a token with a digit) that no tool
    result, no call and no user turn so far contains (learned()'s rule). Free-form notes (an LLM teacher's) are checked by the last rule."""
    if not summary:
        return []
    p, ti = expected_progress(ep), len(ep.turns) - 1
    seen = [r for t in ep.turns for r in t["results"]] + [ep.specs[j]["user"] for j in range(ti + 1)] + \
        [json.dumps(c["arguments"], ensure_ascii=False) for t in ep.turns for c in t["calls"]]
    bad = []
    m = re.search(r"Done: (.*?)\.(?: [A-Z][a-z]+:|$)", summary)
    for n in (m.group(1).split(", ") if m else []):
        bad += [f"Done: {n} did not succeed"] if n not in p["done"] else []
    for n in re.findall(r"(?:^|; )(\w+) \(", summary.split("Failed: ", 1)[1]) if "Failed: " in summary else []:
        bad += [f"Failed: {n} did not fail"] if n not in p["failed"] else []
    values = [kv.split("=", 1)[-1] for kv in summary.split("Known: ", 1)[1].rstrip(".").split("; ")] \
        if "Known: " in summary else []
    values += [v.rstrip(".,;:") for v in _VALUE_RE.findall(summary)]
    for v in dict.fromkeys(values):
        bad += [f"{v!r} was never seen"] if v and not any(_mentions(t, v) for t in seen) else []
    return bad


def summary_truth(line) -> dict:
    """{index of an assistant message in line["messages"]: summary_errors of its summary}, by replaying the
    reference conversation (gen_data.py's format) through an Episode."""
    ep, out = Episode(line, pa=True), {}
    ep.reset()
    for k, m in enumerate(line["messages"]):
        if m["role"] == "assistant" and not ep.done:
            out[k] = summary_errors(parse_message(m["content"]).summary, ep)
            ep.step(m["content"])
    return out


_HEAD_RE = re.compile(r"\s*<summary>.*?</summary>(\s*<plan>.*?</plan>)?", re.S)


def awareness_chars(content) -> int:
    """Length of an assistant content's leading <summary>...</summary> and <plan>...</plan> (0 if it has none):
    the progress-awareness tokens that sft.py --awareness-weight scales."""
    m = _HEAD_RE.match(content or "")
    return m.end() if m else 0


def conversations(messages, context_mode):
    """The conversations a rollout of this reference conversation shows the model. full: the whole thing.
    summary: one per user turn, restarted from the system message and a user message that carries the last
    <summary>/<plan> written so far (carry_text, the text Episode builds). Assistant and tool messages are the
    reference's own dict objects, so a caller can find them by identity."""
    if context_mode == "full":
        return [messages]
    convs, system, summary, plan = [], None, None, None
    for m in messages:
        if m["role"] == "system":
            system = system or m
        elif m["role"] == "user":
            content = carry_text(summary, plan, m["content"]) if convs else m["content"]
            convs.append([system, {"role": "user", "content": content}])
        else:
            convs[-1].append(m)
            if m["role"] == "assistant":  # the same carry rule as Episode
                summary, plan = carry_next(summary, plan, parse_message(m["content"]))
    return convs


def annotated_steps(line, context_mode="full"):
    """Every tool-calling assistant message of a reference conversation (gen_data.py's "messages") as a
    next-message prompt in the context a rollout and SFT show it in -> list of dicts: index (in messages), turn,
    step, type (the turn's), context (the messages before it), tools, prefix (its <summary>/<plan> as written,
    '' without awareness), calls (the reference step) and untrue (summary_errors of its summary)."""
    pa = "<summary>" in line["messages"][0]["content"]
    where = {id(m): k for k, m in enumerate(line["messages"])}
    truth = summary_truth(line) if pa else {}  # each summary against what had happened by then
    out, ti, si = [], -1, 0
    for conv in conversations(line["messages"], context_mode):
        for j, m in enumerate(conv):
            if m["role"] == "user":
                ti, si = ti + 1, 0
            elif m["role"] == "assistant":
                p = parse_message(m["content"])
                if p.calls:
                    prefix = render_message(p.summary, p.plan, []) + "\n" if pa else ""
                    out.append({"index": where[id(m)], "turn": ti, "step": si, "type": line["turns"][ti]["type"],
                                "context": conv[:j], "tools": line["tools"], "prefix": prefix, "calls": p.calls,
                                "untrue": truth.get(where[id(m)], [])})
                    si += 1
    return out


def compare_calls(got_text, want):
    """'' when a message's calls equal a reference step (as a multiset), else the reason: "no tool call",
    "wrong function(s): ..." or "wrong arguments: ..."."""
    got = parse_message(got_text).calls
    key = lambda cs: Counter(_call_key(c) for c in cs)  # noqa: E731
    if not got:
        return "no tool call"
    if sorted(c["name"] for c in got) != sorted(c["name"] for c in want):
        return f"wrong function(s): got {[c['name'] for c in got]}, want {[c['name'] for c in want]}"
    if key(got) != key(want):
        return f"wrong arguments: got {[c['arguments'] for c in got]}, want {[c['arguments'] for c in want]}"
    return ""


def read_tasks(path, need=("envs", "turns")) -> list:
    """Tasks from a JSONL file (one per line, gen_data.py's format). Anything malformed stops the run with
    an error naming the file and line; `need` lists the keys every task must have."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: not found; run python gen_data.py first")
    tasks = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{i}: not valid JSON ({e})")
            if not isinstance(task, dict) or any(k not in task for k in need) or not task.get("turns"):
                raise SystemExit(f"{path}:{i}: not a task with {', '.join(need)} and a non-empty 'turns'")
            tasks.append(task)
    if not tasks:
        raise SystemExit(f"{path}: no tasks; run python gen_data.py first")
    return tasks


# ----------------------------------------------------------------------------------------------
# Episode: one multi-turn task, text in, text out

TURN_TYPES = ("normal", "miss_param", "miss_func", "long_context", "error_recovery")


def make_envs(task) -> dict:
    """Fresh environments for a task: our ENVS by name, or BFCL classes for tasks from bfcl_tasks."""
    if "bfcl" in task:
        lc = task["bfcl"].get("long_context", False)
        return {n: BfclEnv(n, c, long_context=lc) for n, c in task["envs"].items()}
    return {n: ENVS[n](copy.deepcopy(c)) for n, c in task["envs"].items()}


def known_schemas(task) -> dict:
    """name -> schema of every function of the task's envs (offered or held out)."""
    if "bfcl" in task:
        return {s["function"]["name"]: s for n in task["envs"] for s in bfcl_schemas(n)}
    return {s["function"]["name"]: s for s in tool_schemas(task["envs"])}


class Episode:
    """One multi-turn task as a state machine: reset() -> [system, user]; step(assistant text) ->
    ("continue", messages to append) | ("reset", whole new context) | ("done", []).

    Two env sets: self.envs (driven by the model) and self.ref_envs (driven by the ground truth, turn by
    turn, for the checker). A message with <tool_call> blocks runs the valid calls (invalid ones get an
    error result) and counts as one step; a message without calls ends the user turn, which is checked.
    More than max_steps_per_turn steps in a turn, or more than max_calls calls in the episode, force-ends
    the episode and fails the turn (BFCL force-quits after 20 steps). max_turns truncates the task.
    protocol="python" is BFCL's prompt mode (eval.py --bfcl-prompt official): its system prompt with the function
    docs (self.tools is then empty), calls as a Python list `[f(a=1)]`, bare result strings; no awareness.
    """

    def __init__(self, task, context_mode="full", pa=True, max_steps_per_turn=20, max_turns=None, max_calls=None,
                 max_tool_chars=8000, max_arg_chars=20000, protocol="tags"):
        assert context_mode in ("full", "summary"), context_mode
        assert protocol in ("tags", "python"), protocol
        self.task, self.context_mode, self.pa, self.protocol = task, context_mode, pa and protocol == "tags", protocol
        self.max_steps_per_turn, self.max_calls = max_steps_per_turn, max_calls
        self.max_tool_chars, self.max_arg_chars = max_tool_chars, max_arg_chars
        self.specs = task["turns"][:max_turns] if max_turns else task["turns"]
        self.envs, self.ref_envs = make_envs(task), make_envs(task)
        self.known = known_schemas(task)
        self.offered = set(self.known) - set(task.get("held_out", []))
        self.tools = [s for n, s in self.known.items() if n in self.offered]
        self.system = system_prompt(self.pa, task.get("prompt", "full"))
        if protocol == "python":  # BFCL's prompt mode: the docs live in its system prompt, not in the chat template
            self.system, self.tools = bfcl_prompt_system(self._docs(self.tools)), []
        self.turns, self.assistant, self.turn_index, self.messages = [], [], [], []
        self.num_calls, self.model_results = 0, []
        self.last_summary = self.last_plan = None
        self.done, self.forced = False, False

    def _owner(self, name):
        if "bfcl" in self.task:
            return self.envs[_bfcl_owner(name)]
        return self.envs[OWNER[name]]

    def _user_message(self, i) -> dict:
        spec = self.specs[i]
        content = spec["user"]
        added = [n for n in spec.get("add_functions", []) if n in self.known]
        if added:  # announced in the user message: the system prompt is already in the KV cache
            self.offered |= set(added)
            if self.protocol == "python":  # as BFCL's prompt mode: the raw docs (a python repr) first
                content = f"{self._docs([self.known[n] for n in added], hint=False)}\n{content}"
            else:
                content += "\n" + tools_text([self.known[n] for n in added])
        if self.context_mode == "summary" and i > 0:
            content = carry_text(self.last_summary, self.last_plan, content)
        self.turns.append({"user": content, "type": spec.get("type", "normal"), "calls": [], "results": [],
                           "errors": [], "executed": [], "step_calls": [], "steps": 0, "format_ok": [], "passed": None,
                           "reason": "", "state_changing": 0, "gt_results": [], "step_failed": False,
                           "step_errors": []})
        return {"role": "user", "content": content}

    def _docs(self, schemas, hint=True):
        """Function docs for the python protocol: BFCL's own doc entries for BFCL tasks (with the Python 3 hint
        its loader adds to the offered ones), else the "function" part of our schemas."""
        if "bfcl" not in self.task:
            return [s["function"] for s in schemas]
        return [bfcl_raw_doc(s["function"]["name"], hint) for s in schemas]

    def _parse(self, text) -> Parsed:
        if self.protocol == "tags":
            return parse_message(text)
        # BFCL's decoder: strip, wrap in [], parse; anything that does not decode ends the turn (no partial calls)
        p = Parsed()
        body = text.strip("`\n ") if isinstance(text, str) else ""
        calls, errors = parse_python_calls("[" * (not body.startswith("[")) + body + "]" * (not body.endswith("]")))
        p.content = text if isinstance(text, str) else ""
        if errors or not isinstance(text, str):  # plain text is a final reply; broken calls are a format error
            p.errors, p.tags = ["not a python list of calls"] if "(" in body else [], ["text"]
        else:
            p.calls, p.tags = calls, ["tool_call"] * len(calls) or ["text"]
        return p

    def reset(self) -> list:
        msgs = [{"role": "system", "content": self.system}, self._user_message(0)]
        self.messages = list(msgs)
        return msgs

    def progress_targets(self):
        """(facts, names) the next tool-calling message should show: the values and the planned function names
        (repeats kept) of expected_progress(), the causal definition the PAG data is written with."""
        p = expected_progress(self)
        return [v for _, v in p["facts"]], [c["name"] for s in p["steps"] for c in s]

    def _execute(self, call, rec):
        # BFCL mode mirrors BFCL's executor: held-out functions still run if called (its miss_func_49
        # ground truth even uses one early) and types are not checked; our own envs are strict
        bfcl = "bfcl" in self.task
        err = validate_call(call, self.known, None if bfcl else self.offered, self.max_arg_chars, not bfcl)
        rec["calls"].append(call)
        rec["executed"].append(err is None)
        rec["errors"].append(err)  # the call's error text, or None; set again below for an error the env returns
        if err is not None:
            rec["results"].append(json.dumps({"error": err}))
            if self.protocol == "python":
                return {"role": "tool", "content": f"Error during execution: {err}"}
            return tool_message(call["name"], error=err, max_tool_chars=self.max_tool_chars)
        env = self._owner(call["name"])
        raw = env._call(call["name"], copy.deepcopy(call["arguments"]))  # envs may keep (and mutate) arguments
        text = env._result_text(raw)
        rec["results"].append(text)
        env_failed = isinstance(raw, dict) and "error" in raw
        if env_failed:
            rec["errors"][-1] = str(raw["error"])
        rec["step_calls"][-1].append(call)
        self.model_results.append(text)
        if not (is_read_only(call["name"]) or env_failed) and "bfcl" not in self.task:
            rec["state_changing"] += 1
        if self.protocol == "python":  # BFCL's prompt mode feeds back the bare result string, uncapped
            return {"role": "tool", "content": text}
        return tool_message(call["name"], result=env._result_obj(raw), max_tool_chars=self.max_tool_chars)

    def step(self, text):
        if self.done:
            return "done", []
        parsed, rec = self._parse(text), self.turns[-1]
        call_errors = [e for e in parsed.errors if e.startswith("tool_call")]
        ok = format_ok(parsed, self.pa) if self.protocol == "tags" else not parsed.errors
        rec["format_ok"].append(ok)
        # after_error: the message right after a step whose tool results held an error; ends_turn: a final reply
        info = {"turn": len(self.turns) - 1, "format_ok": ok, "calls": len(parsed.calls), "awareness": None,
                "after_error": rec["step_failed"], "ends_turn": not parsed.calls and not call_errors}
        self.assistant.append(info)
        self.turn_index.append(info["turn"])
        self.messages.append({"role": "assistant", "content": text if isinstance(text, str) else ""})
        self.last_summary, self.last_plan = carry_next(self.last_summary, self.last_plan, parsed)
        if info["ends_turn"]:
            self._end_turn()
            return self._next_turn()
        info["awareness"] = awareness_score(parsed.summary, parsed.plan, *self.progress_targets())
        rec["steps"] += 1
        rec["step_calls"].append([])
        msgs = [tool_message("tool_call", error=e, max_tool_chars=self.max_tool_chars) for e in call_errors]
        n_before = len(rec["errors"])
        for call in parsed.calls:
            if self.max_calls is not None and self.num_calls >= self.max_calls:
                return self._force("call budget exhausted")
            self.num_calls += 1
            msgs.append(self._execute(call, rec))
        rec["step_failed"] = bool(call_errors) or any(e is not None for e in rec["errors"][n_before:])
        rec["step_errors"].append(rec["step_failed"])
        if rec["steps"] > self.max_steps_per_turn:
            return self._force(f"more than {self.max_steps_per_turn} steps in one turn")
        self.messages += msgs
        return "continue", msgs

    def _force(self, reason):
        self.forced = True
        self._end_turn(forced=reason)
        self.done = True
        return "done", []

    def _end_turn(self, forced=None):
        rec, spec = self.turns[-1], self.specs[len(self.turns) - 1]
        for step in spec["gt"]:  # advance the reference envs by this turn's ground truth
            for c in step:
                env = self.ref_envs[OWNER[c["name"]]] if "bfcl" not in self.task else \
                    self.ref_envs[_bfcl_owner(c["name"])]
                rec["gt_results"].append(env._result_text(env._call(c["name"], copy.deepcopy(c["arguments"]))))
        if forced:
            rec["passed"], rec["reason"] = False, forced
        else:
            rec["passed"], rec["reason"] = check_turn(self.envs, self.ref_envs, rec["gt_results"], self.model_results,
                                                      rec["type"], rec["state_changing"])

    def _next_turn(self):
        if len(self.turns) >= len(self.specs):
            self.done = True
            return "done", []
        msg = self._user_message(len(self.turns))
        if self.context_mode == "summary":
            msgs = [{"role": "system", "content": self.system}, msg]
            self.messages += msgs
            return "reset", msgs
        self.messages.append(msg)
        return "continue", [msg]

    @property
    def success(self) -> bool:
        return len(self.turns) == len(self.specs) and all(t["passed"] for t in self.turns)

    def decoded_calls(self) -> list:
        """Executed calls as list[turn][step][call] (BFCL's decoded shape). A force-ended turn is left out,
        so a force-quit episode has fewer turns than the task, which BFCL scores as failed."""
        turns = self.turns[:-1] if self.forced else self.turns
        return [[s for s in t["step_calls"] if s] for t in turns]

    def reward_parts(self) -> dict:
        """Reward parts, each in [0, 1]:
        format     = assistant messages that parse cleanly and follow the pa/no-pa format / all messages
        turns      = turns passed / turns of the task (unplayed turns fail)
        success    = 1 if every turn passed else 0
        efficiency = max(0, 1 - (extra + repeats) / max(1, gt calls)), extra = max(0, calls - gt calls),
                     repeats = per turn, copies of an identical call beyond max(1, its count in the gt)
        awareness  = mean awareness_score over tool-calling messages (0 if none; 1 if none and the gt has none)
        """
        n_msgs = len(self.assistant)
        gt_calls = sum(len(s) for t in self.specs for s in t["gt"])
        calls, repeats = 0, 0
        for i, t in enumerate(self.turns):
            calls += len(t["calls"])
            gt_count = Counter(_call_key(c) for s in self.specs[i]["gt"] for c in s)
            for k, n in Counter(_call_key(c) for c in t["calls"]).items():
                repeats += max(0, n - max(1, gt_count[k]))
        extra = max(0, calls - gt_calls)
        aw = [a["awareness"] for a in self.assistant if a["awareness"] is not None]
        return {"format": sum(a["format_ok"] for a in self.assistant) / n_msgs if n_msgs else 0.0,
                "turns": sum(bool(t["passed"]) for t in self.turns) / len(self.specs),
                "success": float(self.success),
                "efficiency": max(0.0, 1.0 - (extra + repeats) / max(1, gt_calls)),
                "awareness": sum(aw) / len(aw) if aw else float(gt_calls == 0)}


def replay(task, calls_per_turn, pa=True, final="Done.", **episode_kwargs) -> Episode:
    """Drive an Episode with given calls (list[turn][step][call]); with pa, each message carries the causal
    summary/plan of progress_note (a plan that names the calls when the ground truth has none left).
    Used by tests, gen_data.py, and the BFCL replay."""
    ep = Episode(task, pa=pa, **episode_kwargs)
    ep.reset()
    for steps in calls_per_turn:
        if ep.done:
            break
        for calls in steps:
            summary = plan = None
            if pa:
                summary, plan = progress_note(ep)
                plan = plan if plan != "Next: ." else "Next: " + ", ".join(c["name"] for c in calls) + "."
            ep.step(render_message(summary, plan, calls))
            if ep.done:
                break
        if not ep.done:
            ep.step(render_message(progress_note(ep, final=True)[0] if pa else None, None, [], final))
    return ep


def ground_truth_calls(task) -> list:
    """The task's ground truth as list[turn][step][call], the shape replay() takes."""
    return [t["gt"] for t in task["turns"]]


# ----------------------------------------------------------------------------------------------
# BFCL adapter: BFCL's own classes, docs, held-out functions and official checker

_BFCL = {}
ADD_FUNCTIONS_MESSAGE = "I have updated some more functions you can choose from. What about now?"
BFCL_CATEGORIES = ("base", "miss_func", "miss_param", "long_context")


def bfcl_available() -> bool:
    try:
        _bfcl()
    except ImportError:
        return False
    return True


def _bfcl():
    """Import the light parts of bfcl_eval once (never eval_runner / model_config: they pull every SDK)."""
    if not _BFCL:
        # without this the package creates folders inside site-packages
        os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                "bfcl_root"))
        import bfcl_eval
        from bfcl_eval.constants import executable_backend_config as cfg
        from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker, multi_turn_utils
        _BFCL.update(root=os.path.dirname(bfcl_eval.__file__), cfg=cfg, checker=multi_turn_checker.multi_turn_checker,
                     utils=multi_turn_utils, docs={}, owner={})
    return _BFCL


def _bfcl_type(spec):
    """BFCL doc parameter spec -> JSON schema (dict->object, float->number, tuple->array, any->no type)."""
    out = {k: v for k, v in spec.items() if k in ("description", "enum", "default")}
    t = spec.get("type")
    t = {"dict": "object", "float": "number", "tuple": "array", "any": None}.get(t, t)
    if t:
        out["type"] = t
    if "items" in spec:
        out["items"] = _bfcl_type(spec["items"])
    if "properties" in spec:
        out["properties"] = {k: _bfcl_type(v) for k, v in spec["properties"].items()}
    if "required" in spec and t == "object":
        out["required"] = spec["required"]
    return out


def bfcl_schemas(class_name: str) -> list:
    """OpenAI-style schemas of a BFCL class, from bfcl_eval/data/multi_turn_func_doc/*.json."""
    b = _bfcl()
    if class_name not in b["docs"]:
        path = os.path.join(b["root"], "data", "multi_turn_func_doc", b["cfg"].MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name])
        with open(path) as f:
            docs = [json.loads(line) for line in f if line.strip()]
        b["docs"][class_name] = [{"type": "function", "function": {
            "name": d["name"], "description": d["description"],
            "parameters": {"type": "object", "properties": {k: _bfcl_type(v) for k, v in d["parameters"]["properties"].items()},
                           "required": d["parameters"].get("required", [])}}} for d in docs]
        for s in b["docs"][class_name]:
            b["owner"][s["function"]["name"]] = class_name
    return b["docs"][class_name]


def bfcl_raw_doc(name: str, hint: bool = True) -> dict:
    """BFCL's own doc entry of a function (bfcl_schemas must have registered it); hint=True appends the
    " Note that the provided function is in Python 3 syntax." its loader adds to offered functions."""
    b = _bfcl()
    cls = b["owner"][name]
    if cls not in b.setdefault("raw", {}):
        path = os.path.join(b["root"], "data", "multi_turn_func_doc", b["cfg"].MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls])
        with open(path) as f:
            b["raw"][cls] = {d["name"]: d for d in map(json.loads, filter(str.strip, f))}
    doc = copy.deepcopy(b["raw"][cls][name])
    if hint:
        doc["description"] += " Note that the provided function is in Python 3 syntax."
    return doc


def bfcl_prompt_system(docs: list) -> str:
    """BFCL's default prompt-mode system prompt (ret_fmt=python, no tag, json docs, plaintext, classic style),
    assembled from bfcl_eval.constants.default_prompts as model_handler.utils.formulate_system_prompt does
    (that module itself needs the SDK dependencies)."""
    os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bfcl_root"))
    from bfcl_eval.constants import default_prompts as P
    style = P.PROMPT_STYLE_TEMPLATES["classic"]
    return P.PROMPT_TEMPLATE_MAPPING["plaintext"].format(
        persona=style["persona"], task=style["task"],
        tool_call_format=style["tool_call_no_tag"].format(output_format=P.OUTPUT_FORMAT_MAPPING["python"],
                                                          param_types=P.PARAM_TYPE_MAPPING["python"]),
        multiturn_behavior=style["multiturn_behavior"],
        available_tools=style["available_tools"].format(format="json", functions=json.dumps(docs, indent=4)))


def _bfcl_owner(name):
    return _bfcl()["owner"][name]


class BfclEnv(Env):
    """A BFCL environment class behind our Env interface: same state check, BFCL's result strings."""

    def __init__(self, class_name: str, config: dict, long_context: bool = False):
        super().__init__({})
        b = _bfcl()
        bfcl_schemas(class_name)  # registers the owner of each function
        module = importlib.import_module(b["cfg"].CLASS_FILE_PATH_MAPPING[class_name])
        self._inner = getattr(module, class_name)()
        if class_name not in b["cfg"].STATELESS_CLASSES:
            self._inner._load_scenario(copy.deepcopy(config), long_context=long_context)

    def _state(self):
        return {k: v for k, v in vars(self._inner).items() if not k.startswith("_")}

    def _call(self, name, args):
        try:
            return getattr(self._inner, name)(**args)
        except Exception as e:  # mirrors BFCL's executor, which turns any exception into a result string
            return f"Error during execution: {e}"

    def _result_text(self, result):
        """BFCL's own conversion (multi_turn_utils.execute_multi_turn_func_call), so responses compare alike."""
        if isinstance(result, str):
            return result
        if isinstance(result, dict):
            try:
                return json.dumps(result)
            except (TypeError, ValueError):
                return str(result)
        return str(result)

    def _result_obj(self, result):
        try:
            json.dumps(result)
            return result
        except (TypeError, ValueError):
            return self._result_text(result)


def bfcl_tasks(category: str, limit=None) -> list:
    """BFCL multi-turn entries of a category ('base', 'miss_func', 'miss_param', 'long_context') as tasks.

    Ground-truth strings are parsed with ast (positional arguments -> keywords via the class signatures).
    BFCL does not split a turn into steps; we make each call its own step, except that consecutive calls
    of the same function share one (parallel) step: one turn of long_context_38 has 32 rm calls, more
    than BFCL's 20-step limit if taken one by one. Calls in a message run in order, so results are the same. The entry id, category and original gt strings go in task["bfcl"].
    """
    b = _bfcl()
    cat = category if category.startswith("multi_turn_") else "multi_turn_" + category
    data = os.path.join(b["root"], "data")
    with open(os.path.join(data, f"BFCL_v4_{cat}.json")) as f:
        entries = [json.loads(line) for line in f if line.strip()][:limit]
    with open(os.path.join(data, "possible_answer", f"BFCL_v4_{cat}.json")) as f:
        answers = {a["id"]: a["ground_truth"] for a in map(json.loads, f)}
    tasks = []
    for e in entries:
        classes = e["involved_classes"]
        sigs = {}
        for cls in classes:
            module = importlib.import_module(b["cfg"].CLASS_FILE_PATH_MAPPING[cls])
            for s in bfcl_schemas(cls):
                fn = getattr(getattr(module, cls), s["function"]["name"])
                sigs[s["function"]["name"]] = list(inspect.signature(fn).parameters)[1:]
        missed = {int(k): v for k, v in e.get("missed_function", {}).items()}
        turns = []
        for i, (q, gt) in enumerate(zip(e["question"], answers[e["id"]])):
            calls = []
            for s in gt:
                c, errs = parse_python_calls(s, sigs)
                if errs:
                    raise ValueError(f"{e['id']} turn {i}: cannot parse ground truth {s!r}: {errs}")
                calls += c
            kind = {"multi_turn_long_context": "long_context"}.get(cat, "normal")
            if not gt and cat in ("multi_turn_miss_func", "multi_turn_miss_param"):
                kind = cat[len("multi_turn_"):]
            steps = []
            for c in calls:
                if steps and steps[-1][-1]["name"] == c["name"]:
                    steps[-1].append(c)
                else:
                    steps.append([c])
            turns.append({"user": "\n".join(m["content"] for m in q) if q else ADD_FUNCTIONS_MESSAGE,
                          "type": kind, "gt": steps, "add_functions": missed.get(i, [])})
        tasks.append({"id": e["id"], "envs": {c: e["initial_config"].get(c, {}) for c in classes}, "turns": turns,
                      "held_out": [n for v in missed.values() for n in v], "split": "test", "tags": {"bfcl": cat},
                      "bfcl": {"category": cat, "ground_truth": answers[e["id"]],
                               "long_context": cat == "multi_turn_long_context"}})
    return tasks


def bfcl_score(task, decoded_calls_per_turn) -> bool:
    """The official BFCL multi-turn checker on our calls (list[turn][step][call], e.g. ep.decoded_calls()).

    Calls are validated, then rendered by render_python_call (literal keyword arguments only: the checker
    eval()s these strings). A fresh model name per call and deleting its cached env instances afterwards
    keep scores independent (BFCL caches instances in module globals by model name + entry id).
    """
    b = _bfcl()
    gt = task["bfcl"]["ground_truth"]
    if len(decoded_calls_per_turn) != len(gt):  # force-terminated: BFCL fails the whole entry
        return False
    known = known_schemas(task)
    decoded = [[[render_python_call(c) for c in step if validate_call(c, known, None, 10**9, False) is None]
                for step in turn] for turn in decoded_calls_per_turn]
    decoded = [[s for s in turn if s] for turn in decoded]
    entry = {"id": task["id"], "initial_config": task["envs"], "involved_classes": list(task["envs"])}
    name = f"parlmt_{uuid.uuid4().hex}"
    cache = vars(b["utils"])  # the module globals() its executor caches instances in
    try:
        result = b["checker"](decoded, gt, entry, task["bfcl"]["category"], name)
    except AssertionError:
        return False
    finally:
        for k in [k for k in cache if k.startswith(name)]:
            del cache[k]
    return bool(result["valid"])
