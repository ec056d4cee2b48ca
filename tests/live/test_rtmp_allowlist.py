"""Where an RTMP push may go: rtmp/rtmps URLs only, to hosts the operator lists (patterns with '*', optional port),
matched on the URL's host as written; malformed URLs and settings are refused with a message saying why."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from live.settings import OutputSettings
from live.sinks.rtmp import RtmpRefused, RtmpUrlError, check_url

ALLOWED = ["a.rtmp.youtube.com", "*.contribute.live-video.net", "127.0.0.1:1935", "[::1]"]


@pytest.mark.parametrize("url", [
    "rtmp://a.rtmp.youtube.com/live2/key",
    "rtmps://A.RTMP.YOUTUBE.COM:443/live2/key",
    "rtmp://fra05.contribute.live-video.net/app/key",
    "rtmp://127.0.0.1/live/key",
    "rtmp://[::1]:1940/live/key",
])
def test_listed_hosts_are_allowed(url):
    assert check_url(url, ALLOWED) == url


@pytest.mark.parametrize("url", [
    "rtmp://b.rtmp.youtube.com/live2/key",
    "rtmp://contribute.live-video.net/app/key",
    "rtmp://a.rtmp.youtube.com.evil.example/live2/key",
    "rtmp://127.0.0.1:8080/live/key",
    "rtmp://2130706433/live/key",
    "rtmp://localhost/live/key",
])
def test_other_hosts_and_ports_are_refused(url):
    with pytest.raises(RtmpRefused, match="rtmp_allowed_hosts"):
        check_url(url, ALLOWED)


def test_nothing_is_allowed_by_default():
    with pytest.raises(RtmpRefused):
        check_url("rtmp://a.rtmp.youtube.com/live2/key", OutputSettings().rtmp_allowed_hosts)


@pytest.mark.parametrize("url", ["rtmpt://127.0.0.1/live/key", "file:///etc/passwd", "rtmp://127.0.0.1:99999/a/b",
                                 "rtmp://[zz]/a/b", "rtmp://127.0.0.1/live/key live=1", "rtmp://127.0.0.1"])
def test_malformed_urls_are_refused_before_the_allow_list(url):
    with pytest.raises(RtmpUrlError) as info:
        check_url(url, ["*"])
    assert not isinstance(info.value, RtmpRefused)


def test_allow_list_entries_are_validated():
    assert OutputSettings(rtmp_allowed_hosts=["Live.Example.com:1935"]).rtmp_allowed_hosts == ["live.example.com:1935"]
    for bad in ("rtmp://host", "host:99999", "host/path", ""):
        with pytest.raises(ValidationError, match="RTMP host pattern"):
            OutputSettings(rtmp_allowed_hosts=[bad])
