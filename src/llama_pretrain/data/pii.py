"""PII scrubbing: e-mail addresses, phone numbers and IP addresses become placeholders.

Regular expressions in the spirit of dolma's PII tagger; IP candidates are validated with the
``ipaddress`` module so version strings such as ``1.2.3`` or ``10.0.0.300`` are left alone.
"""

from __future__ import annotations

import ipaddress
import re

EMAIL_TOKEN, PHONE_TOKEN, IP_TOKEN = "<EMAIL_ADDRESS>", "<PHONE_NUMBER>", "<IP_ADDRESS>"
KINDS = ("email", "phone", "ip")  # the keys of the counts (and of the manifest's pii_replacements)

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# +1 (555) 123-4567, 555-123-4567, 555.123.4567, +44 20 7946 0958; at least 10 digits overall
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)|\d{2,4})[\s.-]\d{3,4}[\s.-]\d{3,4}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])")


def _valid_ip(m: re.Match) -> str:
    try:
        ipaddress.ip_address(m.group(0))
    except ValueError:
        return m.group(0)
    return IP_TOKEN


def _phone(m: re.Match) -> str:
    return PHONE_TOKEN if sum(c.isdigit() for c in m.group(0)) >= 10 else m.group(0)


def scrub_pii(text: str, emails: bool = True, phones: bool = True, ips: bool = True) -> tuple[str, dict[str, int]]:
    """The text with PII replaced, and how many of each kind were replaced."""
    counts = dict.fromkeys(KINDS, 0)
    if emails and "@" in text:
        text, counts["email"] = _EMAIL.subn(EMAIL_TOKEN, text)
    if ips:
        before = text.count(IP_TOKEN)
        text = _IPV4.sub(_valid_ip, text)
        if ":" in text:
            text = _IPV6.sub(_valid_ip, text)
        counts["ip"] = text.count(IP_TOKEN) - before
    if phones:
        before = text.count(PHONE_TOKEN)
        text = _PHONE.sub(_phone, text)
        counts["phone"] = text.count(PHONE_TOKEN) - before
    return text, counts
