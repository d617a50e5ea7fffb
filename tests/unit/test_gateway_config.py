"""The gateway's pure parts: [gateway]/[routes] config, routing, allow-lists, idle completion."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dicommail.config import GatewayConfig, RouteConfig, parse_config, render_template
from dicommail.errors import ConfigError
from dicommail.gateway.ingest import StudyTracker
from dicommail.gateway.scp import address_allowed, route_for


def _parse(text: str) -> object:
    return parse_config(tomllib.loads(text), Path("/x"))


def test_gateway_defaults_are_safe_and_the_template_validates() -> None:
    config = parse_config(tomllib.loads(render_template("a@b.example")), Path("/x"))
    assert config.gateway.host == "127.0.0.1"
    assert (config.gateway.study_idle_seconds, config.gateway.max_parallel_studies) == (30, 2)
    assert config.routes == {}


def test_routes_are_parsed_and_checked() -> None:
    config = parse_config(tomllib.loads("""
[gateway]
default_route = "DR_A"
allowed_calling_aets = ["PACS1"]
allowed_addresses = ["10.0.0.0/8", "192.0.2.7"]
[routes."DR_A"]
recipients = ["a@b.example", "c@d.example"]
note = "hello"
emergency = true
max_mail_size = "5M"
"""), Path("/x"))
    route = config.routes["DR_A"]
    assert route == RouteConfig("DR_A", ("a@b.example", "c@d.example"), "hello", True, 5 * 1024**2)
    assert config.gateway.allowed_calling_aets == ("PACS1",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[routes."A"]\nrecipients = ["not-an-address"]', "not a mail address"),
        ('[routes."A"]\nrecipients = []', "recipients is empty"),
        ('[routes."A"]\nrecipients = "a@b.example"', "list of strings"),
        ('[routes."A"]\nrecipients = ["a@b.example"]\ncolour = 1', "unknown setting"),
        ('[routes."MUCH_TOO_LONG_AE_TITLE"]\nrecipients = ["a@b.example"]', "AE title"),
        ('[gateway]\ndefault_route = "NONE"', "no [routes] table"),
        ('[gateway]\nallowed_addresses = ["somewhere"]', "not an IP address"),
        ('[gateway]\nallowed_calling_aets = ["BACK\\\\SLASH"]', "AE title"),
        ("[gateway]\nport = 0", "at least 1"),
    ],
)
def test_bad_gateway_settings_are_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _parse(text)


def test_routing_and_allow_lists() -> None:
    routes = {"DR_A": RouteConfig("DR_A", ("a@b.example",))}
    assert route_for("DR_A", GatewayConfig(), routes) == "DR_A"
    assert route_for("OTHER", GatewayConfig(), routes) is None
    assert route_for("OTHER", GatewayConfig(default_route="DR_A"), routes) == "DR_A"
    assert address_allowed("192.0.2.7", ())
    assert address_allowed("10.1.2.3", ("10.0.0.0/8",))
    assert address_allowed("::ffff:10.1.2.3", ("10.0.0.0/8",))
    assert not address_allowed("192.0.2.7", ("10.0.0.0/8",))


def test_a_study_is_idle_only_after_its_last_association_ended() -> None:
    now = [0.0]
    tracker = StudyTracker(clock=lambda: now[0])
    key = ("DR_A", "1.2.3")
    tracker.begin(key, 1)
    tracker.begin(key, 2)
    now[0] = 100.0
    with tracker.lock:
        assert not tracker.is_idle(key, 30)  # associations still open
    tracker.end_association(1)
    now[0] = 200.0
    with tracker.lock:
        assert not tracker.is_idle(key, 30)  # association 2 still open
    tracker.end_association(2)
    now[0] = 229.0
    with tracker.lock:
        assert not tracker.is_idle(key, 30)
    now[0] = 230.0
    with tracker.lock:
        assert tracker.is_idle(key, 30)
    tracker.restart([key])  # after a restart the idle time starts anew
    with tracker.lock:
        assert not tracker.is_idle(key, 30)
