"""Every admin-API URL goes through halb.tls.AdminTls.url (https, verified against the
cluster CA), never a hand-built `f"http://{api}..."`: that would speak plain HTTP to a TLS
port (and fail), or, worse, to an --insecure-dev port without anyone noticing. Admin API
addresses are named `api` throughout (`api`, `member.api`, `leader.api`, `self.api(i)`),
so an f-string URL whose host part mentions `api` is one."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hand_built_admin_urls(tree: ast.AST, source: str) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.JoinedStr) or len(node.values) < 2:
            continue
        head, host = node.values[0], node.values[1]
        if isinstance(head, ast.Constant) and isinstance(head.value, str) and \
                head.value.startswith(("http://", "https://")) and isinstance(host, ast.FormattedValue):
            if "api" in (ast.get_source_segment(source, host.value) or "").lower():
                lines.append(node.lineno)
    return lines


def test_no_hand_built_admin_urls():
    found = []
    for path in sorted([*(ROOT / "halb").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        source = path.read_text()
        found += [f"{path.relative_to(ROOT)}:{n}" for n in hand_built_admin_urls(ast.parse(source), source)]
    assert not found, f"admin API URLs built by hand (use AdminTls.url): {found}"


def test_the_check_finds_one():
    source = 'url = f"http://{member.api}/v1/admin/shutdown"\nok = f"http://{addr}/products"\n'
    assert hand_built_admin_urls(ast.parse(source), source) == [1]
