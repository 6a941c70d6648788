"""The MCP mapping's fixed points: canonical arguments, the bytes a delivery hash commits to, tool URLs."""

from __future__ import annotations

import pytest
from mcp import types

from escrow_py.mcp import canonical_arguments, delivered_bytes, paid_tool, result_text, tool_url
from escrow_py.mcp._wire import tool_name_of
from escrow_py.protocol.errors import ConfigError


def test_canonical_arguments_sort_keys_at_every_level_and_keep_utf8() -> None:
    args = {"b": 1, "a": {"d": "été", "c": [1, 2.5, None, True]}}
    assert canonical_arguments(args) == '{"a":{"c":[1,2.5,null,true],"d":"été"},"b":1}'.encode()
    assert canonical_arguments(None) == canonical_arguments({}) == b"{}"


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": float("inf")}, {"x": object()}])
def test_arguments_json_cannot_carry_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        canonical_arguments(bad)


def test_the_delivered_bytes_are_the_utf8_of_the_one_text_item() -> None:
    text = '{"note":"été ✓"}'
    one = types.CallToolResult(content=[types.TextContent(type="text", text=text)])
    assert delivered_bytes(one) == text.encode("utf-8")
    assert result_text({"note": "été ✓"}) == text  # not \\u-escaped: the same string the client decodes
    two = types.CallToolResult(content=[types.TextContent(type="text", text="a")] * 2)
    image = types.CallToolResult(content=[types.ImageContent(type="image", data="AA==", mimeType="image/png")])
    surrogate = types.CallToolResult(content=[types.TextContent(type="text", text="\udc80")])
    assert delivered_bytes(two) is None and delivered_bytes(image) is None and delivered_bytes(surrogate) is None


def test_tool_urls_and_names() -> None:
    assert tool_url("get_score.v2") == "mcp://tool/get_score.v2"
    assert tool_name_of("mcp://tool/get_score.v2") == "get_score.v2"
    assert tool_name_of("https://api.example/score") is None
    for bad in ("", "has space", "a/b", "{x}", "x" * 129):
        with pytest.raises(ConfigError):
            paid_tool(bad, 1)
