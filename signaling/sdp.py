"""Offer and ICE candidate checks that run before a session starts, so a bad offer costs no engine and no
admission slot, and its refusal says which line is wrong and why.

The grammar follows RFC 8866 (SDP) and RFC 8839 (ICE candidates) for the lines aiortc's parser reads, plus what
WebRTC (RFC 8829) needs of every media section: a unique ``a=mid``, ICE credentials, a DTLS fingerprint and a
DTLS role (``a=setup``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from aiortc import rtp
from aiortc.sdp import FMTP_INT_PARAMETERS

from live.peer import OfferError, parse_offer
from live.session import Session

log = logging.getLogger(__name__)

MAX_LINE_CHARS = 4096
LINE_TYPES = "vosiuepcbtrzkam"
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
SETUP_ROLES = ("actpass", "active", "passive")
FINGERPRINT = re.compile(r"(sha-1|sha-224|sha-256|sha-384|sha-512) [0-9a-f]{2}(:[0-9a-f]{2})+", re.IGNORECASE)
CANDIDATE = re.compile(r"(?:candidate:)?(?P<foundation>[A-Za-z0-9+/]{1,32}) (?P<component>[0-9]{1,3}) "
                       r"(?P<transport>[A-Za-z]+) (?P<priority>[0-9]{1,10}) (?P<address>\S+) (?P<port>[0-9]{1,5}) "
                       r"typ (?P<type>host|srflx|prflx|relay)(?P<extensions>( \S+)*)")
MEDIA = re.compile(r"m=(?P<kind>[^ ]+) (?P<port>[0-9]{1,5}) (?P<proto>[A-Z/]+) (?P<formats>.+)")
NUMBER = r"[0-9]{1,10}"
ATTRIBUTE_VALUES: dict[str, tuple[re.Pattern, str]] = {
    "extmap": (re.compile(rf"{NUMBER}(/[a-z]+)? \S+"), "<id>[/<direction>] <URI>"),
    "max-message-size": (re.compile(NUMBER), "a number"),
    "rtcp": (re.compile(rf"{NUMBER}( IN IP[46] \S+)?"), "<port> [IN IP4|IP6 <address>]"),
    "rtpmap": (re.compile(r"[0-9]{1,3} [^/ ]+/[0-9]{1,10}(/[0-9]{1,3})?"), "<payload type> <codec>/<clock rate>"
                                                                               "[/<channels>]"),
    "fmtp": (re.compile(r"[0-9]{1,3} \S.*"), "<payload type> <parameters>"),
    "rtcp-fb": (re.compile(r"(\*|[0-9]{1,3}) \S+( .*)?"), "<payload type|*> <type> [<parameter>]"),
    "sctpmap": (re.compile(rf"{NUMBER} .+"), "<number> <description>"),
    "sctp-port": (re.compile(NUMBER), "a number"),
    "ssrc": (re.compile(rf"{NUMBER} [^:\s]+:.*"), "<ssrc> <attribute>:<value>"),
    "ssrc-group": (re.compile(rf"\S+( {NUMBER})*"), "<semantics> <ssrc>…"),
    "fingerprint": (FINGERPRINT, "<sha-256|sha-1|…> <hex bytes separated by colons>"),
    "setup": (re.compile("|".join(SETUP_ROLES)), " or ".join(SETUP_ROLES)),
    "mid": (re.compile(r"\S{1,64}"), "a media id without spaces"),
    "ice-ufrag": (re.compile(r"\S{1,256}"), "the ICE username fragment"),
    "ice-pwd": (re.compile(r"\S{1,256}"), "the ICE password"),
}
SESSION_ATTRIBUTES = ("fingerprint", "setup", "ice-ufrag", "ice-pwd")


def check_candidate(value: str) -> None:
    """Check one ICE candidate (``candidate:…`` as trickled, or an SDP ``a=candidate`` value); raises
    :class:`OfferError` saying what is wrong."""
    match = CANDIDATE.fullmatch(value.strip())
    if match is None:
        raise OfferError(f"malformed ICE candidate {value[:200]!r}: expected 'candidate:<foundation> <component> "
                         "<udp|tcp> <priority> <address> <port> typ <host|srflx|prflx|relay> [raddr … rport …]'")
    if match["transport"].lower() not in ("udp", "tcp"):
        raise OfferError(f"ICE candidate transport must be udp or tcp, got {match['transport']!r}")
    if not 1 <= int(match["component"]) <= 256 or int(match["port"]) > 65535 or int(match["priority"]) >= 2**32:
        raise OfferError(f"ICE candidate {value[:200]!r} has a component, port or priority out of range")
    extensions = match["extensions"].split()
    if len(extensions) % 2:
        raise OfferError(f"ICE candidate {value[:200]!r}: attribute {extensions[-1]!r} has no value")
    for name, ext in zip(extensions[::2], extensions[1::2]):
        if name == "rport" and not (ext.isascii() and ext.isdigit() and int(ext) <= 65535):
            raise OfferError(f"ICE candidate {value[:200]!r}: rport must be a port number, got {ext!r}")


class _Section:
    """What one media section (or the session level) declares of what WebRTC needs."""

    def __init__(self, kind: str = "session") -> None:
        self.kind = kind
        self.attributes: dict[str, str] = {}
        self.rtpmap: set[int] = set()
        self.fmtp: dict[int, str] = {}

    def has(self, name: str, session: _Section) -> bool:
        return name in self.attributes or name in session.attributes


def _check_media_line(line: str) -> None:
    match = MEDIA.fullmatch(line)
    if match is None:
        raise ValueError("expected 'm=<audio|video|application> <port> <protocol> <formats…>'")
    if int(match["port"]) > 65535:
        raise ValueError(f"port {match['port']} is out of range")
    if match["kind"] in ("audio", "video"):
        for fmt in match["formats"].split():
            if not (fmt.isascii() and fmt.isdigit()) or int(fmt) > 127 or int(fmt) in rtp.FORBIDDEN_PAYLOAD_TYPES:
                raise ValueError(f"payload type {fmt!r} is not a number 0-127 outside 72-76")


def _check_attribute(line: str, section: _Section) -> None:
    name, colon, value = line[2:].partition(":")
    if name == "candidate":
        check_candidate(value)
        return
    rule = ATTRIBUTE_VALUES.get(name)
    if rule is None:
        return
    pattern, form = rule
    if not colon or pattern.fullmatch(value) is None:
        raise ValueError(f"a={name} takes {form}")
    if name == "rtpmap":
        section.rtpmap.add(int(value.split()[0]))
    elif name == "fmtp":
        payload, parameters = value.split(" ", 1)
        section.fmtp.setdefault(int(payload), line)
        for param in parameters.split(";"):
            key, eq, number = param.partition("=")
            if eq and key in FMTP_INT_PARAMETERS and not (number.isascii() and number.isdigit()):
                raise ValueError(f"fmtp parameter {key} must be a number, got {number!r}")


def _lines(sdp: str, visit: Callable[[int, str], None]) -> None:
    for number, line in enumerate(sdp.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            visit(number, line)
        except (ValueError, OfferError) as exc:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise OfferError(f"SDP offer line {number} ({shown!r}): {exc}") from None


def check_offer(sdp: str, need: tuple[str, ...] = ()) -> None:
    """Check an SDP offer completely before a session starts: syntax line by line, what each media section needs,
    and the media kinds in ``need``; raises :class:`OfferError` naming the line or section at fault."""
    session = _Section()
    sections: list[_Section] = []

    def visit(number: int, line: str) -> None:
        if len(line) > MAX_LINE_CHARS:
            raise ValueError(f"line is longer than {MAX_LINE_CHARS} characters")
        if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
            raise ValueError("not an SDP line: SDP lines look like '<letter>=<value>'")
        if line[0] not in LINE_TYPES:
            raise ValueError(f"{line[0]}= is not an SDP line type (RFC 8866 has {', '.join(LINE_TYPES)})")
        if CONTROL.search(line):
            raise ValueError("the line holds a control character (NUL, ESC, …)")
        kind = line[0]
        if kind == "v" and line != "v=0":
            raise ValueError("the version line must be 'v=0'")
        if kind == "c" and not re.fullmatch(r"c=IN IP[46] \S+", line):
            raise ValueError("expected 'c=IN IP4 <address>' or 'c=IN IP6 <address>'")
        if kind == "m":
            _check_media_line(line)
            sections.append(_Section(line[2:].split(" ", 1)[0]))
        elif kind == "a":
            target = sections[-1] if sections else session
            _check_attribute(line, target)
            name, _, value = line[2:].partition(":")
            if sections or name in SESSION_ATTRIBUTES:
                target.attributes.setdefault(name, value)

    if not sdp.strip():
        raise OfferError("empty SDP offer")
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("not an SDP offer (it must start with 'v=0')")
    _lines(sdp, visit)
    for index, section in enumerate(sections):
        for payload, line in section.fmtp.items():
            if payload not in section.rtpmap:
                raise OfferError(f"SDP offer's media section {index + 1} ({section.kind}): {line!r} is for payload "
                                 f"type {payload}, which has no a=rtpmap")
    parse_offer(sdp, need=need)
    mids: set[str] = set()
    for index, section in enumerate(sections):
        where = f"media section {index + 1} ({section.kind})"
        mid = section.attributes.get("mid")
        if mid is None:
            raise OfferError(f"SDP offer's {where} has no a=mid line; WebRTC offers name every section")
        if mid in mids:
            raise OfferError(f"SDP offer's {where} repeats a=mid:{mid}; every section needs its own mid")
        mids.add(mid)
        if not (section.has("ice-ufrag", session) and section.has("ice-pwd", session)):
            raise OfferError(f"SDP offer's {where} has no a=ice-ufrag/a=ice-pwd: ICE cannot run without them")
        if not section.has("fingerprint", session):
            raise OfferError(f"SDP offer's {where} has no a=fingerprint: WebRTC media must be encrypted with DTLS "
                             "and the fingerprint authenticates it")
        if not section.has("setup", session):
            raise OfferError(f"SDP offer's {where} has no a=setup (the DTLS role; offers say a=setup:actpass)")


async def answer(session: Session, connect: Awaitable[str]) -> str:
    """The SDP answer from ``connect`` (a session's first peer); if the offer cannot be answered after all, the
    session is closed at once, freeing its admission slot, and :class:`OfferError` says why."""
    try:
        return await connect
    except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds for offers it cannot answer
        await session.close("offer rejected")
        if isinstance(exc, OfferError):
            raise
        log.warning("session %s: offer could not be answered: %s: %s", session.id, exc.__class__.__name__, exc)
        raise OfferError(f"the SDP offer could not be answered: {exc or exc.__class__.__name__}") from None
