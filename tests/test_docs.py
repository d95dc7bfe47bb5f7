"""The documentation holds together: README.md and every page under docs/.

Every relative link points at a file or folder that exists in the repository, every
`#anchor` (on the same page or `page.md#anchor`) matches a heading's GitHub slug in its
target, each docs page opens with a title and a table of contents linking each of its
`##` sections, the README stays a landing page (at most 250 lines), no page points at
material a clone does not contain, and every setting the code reads is documented.
Standard library and pytest only.
"""

import os
import re
import unicodedata
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README_MAX_LINES = 250
# Material a clone does not contain (or must not be pointed at): never named on a page.
FORBIDDEN = (
    (re.compile(r"SPEC\.md", re.I), "SPEC.md is not part of the repository"),
    (re.compile(r"daraja_api\.md", re.I), "daraja_api.md is not part of the repository"),
    (re.compile(r"bench/results", re.I),
     "bench/results is git-ignored; point at bench/latest.md, .json or .png"),
    (re.compile(r"\bthe spec\b", re.I), "readers have no spec: say what the code does"),
    (re.compile(r"\.\./shared", re.I), "../shared is outside the repository"),
)
EXTERNAL = ("http://", "https://", "mailto:")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target), with an optional "title"; link text may hold code.
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"\[[^\[\]]+\]\[[^\[\]]*\]")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINE_ANCHOR = re.compile(r"L\d+(-L\d+)?")


def doc_files():
    """README.md and docs/*.md, as paths relative to the repository root."""
    pages = sorted(f for f in os.listdir(DOCS) if f.endswith(".md")) if os.path.isdir(DOCS) else []
    return ["README.md"] + [f"docs/{name}" for name in pages]


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def prose_lines(text):
    """(line number, line) outside fenced code blocks, inline code neutralised so that
    brackets inside backticks are not read as links."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        yield number, INLINE_CODE.sub(
            lambda m: m.group(1) + re.sub(r"[\[\]()]", " ", m.group(2)) + m.group(1), line)


def heading_text(raw):
    """The text GitHub renders for a heading: links reduced to their text, code and
    emphasis marks dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    return text.replace("`", "").replace("*", "")


def slugify(text):
    """GitHub's anchor for a heading: lower case, punctuation other than - and _
    dropped, each space a hyphen."""
    text = unicodedata.normalize("NFC", text.strip().lower())
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def headings(text):
    """[(level, heading text, slug)] of a page, duplicates numbered as GitHub does."""
    found, seen = [], {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            title = heading_text(match.group(2))
            base = slugify(title)
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.append((len(match.group(1)), title, base if count == 0 else f"{base}-{count}"))
    return found


def anchors(rel):
    return {slug for _, _, slug in headings(read(rel))}


def links(text):
    """[(line number, target)] of every inline link and image outside code."""
    found = []
    for number, line in prose_lines(text):
        for match in LINK.finditer(line):
            found.append((number, match.group(2)))
    return found


def link_problems(rel):
    """Every broken relative link or anchor in page `rel`, as sentences."""
    problems = []
    text = read(rel)
    here = os.path.dirname(os.path.join(ROOT, rel))
    for number, line in prose_lines(text):
        if REFERENCE_LINK.search(LINK.sub("", line)):
            problems.append(f"{rel}:{number}: a reference-style link; write inline links"
                            " so they can be checked")
    for number, target in links(text):
        where = f"{rel}:{number}: link ({target})"
        if not target:
            problems.append(f"{where}: empty target")
            continue
        if target.startswith(EXTERNAL):
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            problems.append(f"{where}: a scheme other than http(s) or mailto")
            continue
        path, _, fragment = target.partition("#")
        path = unquote(path)
        if path.startswith("/"):
            problems.append(f"{where}: an absolute path; links must be relative to the page")
            continue
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, rel)
        if os.path.commonpath([full, ROOT]) != ROOT:
            problems.append(f"{where}: points outside the repository")
            continue
        if not os.path.exists(full):
            problems.append(f"{where}: {os.path.relpath(full, ROOT)} does not exist")
            continue
        if not fragment:
            continue
        if full.endswith(".md") and os.path.isfile(full):
            target_rel = os.path.relpath(full, ROOT)
            if fragment not in anchors(target_rel):
                problems.append(f"{where}: no heading in {target_rel} has the anchor"
                                f" #{fragment}")
        elif not (os.path.isfile(full) and LINE_ANCHOR.fullmatch(fragment)):
            problems.append(f"{where}: an anchor on a file that is not a Markdown page"
                            " (only #L<n> line anchors are allowed there)")
    return problems


@pytest.mark.parametrize("rel", doc_files())
def test_relative_links_and_anchors_resolve(rel):
    problems = sorted(link_problems(rel), key=lambda p: int(p.split(":")[1]))
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("rel", doc_files())
def test_no_page_points_at_material_a_clone_lacks(rel):
    problems = []
    for number, line in enumerate(read(rel).splitlines(), 1):
        for pattern, why in FORBIDDEN:
            if pattern.search(line):
                problems.append(f"{rel}:{number}: mentions {pattern.pattern!r}: {why}")
    assert not problems, "\n".join(problems)


def test_readme_is_a_landing_page():
    lines = read("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move"
        " depth into docs/")
    linked = {target.partition("#")[0] for _, target in links(read("README.md"))}
    missing = [rel for rel in doc_files()[1:]
               if rel != "docs/README.md" and rel not in linked]
    assert not missing, f"README.md does not link to these docs pages: {missing}"


@pytest.mark.parametrize("rel", [f for f in doc_files() if f.startswith("docs/")])
def test_docs_page_has_title_summary_and_table_of_contents(rel):
    text = read(rel)
    lines = text.splitlines()
    assert lines and lines[0].startswith("# "), f"{rel}: the first line must be its # title"
    body = [line for line in lines[1:] if line.strip()]
    assert body and not body[0].startswith(("#", "-", "|", "```")), (
        f"{rel}: the title must be followed by a sentence saying what the page covers")
    own = {target[1:] for _, target in links(text) if target.startswith("#")}
    sections = [(title, slug) for level, title, slug in headings(text) if level == 2]
    assert sections, f"{rel}: a docs page needs ## sections"
    missing = [f"## {title} (#{slug})" for title, slug in sections if slug not in own]
    assert not missing, (f"{rel}: the table of contents does not link to these sections:"
                         f" {missing}")


def names_in(path, pattern):
    return sorted(set(re.findall(pattern, read(path), re.M)))


def test_every_gateway_setting_is_documented():
    names = names_in("config.py", r'^\s*\("((?:MPESA|GATEWAY|LOG)_[A-Z0-9_]+)",')
    assert len(names) > 20, "the settings table of config.py was not found"
    page = read("docs/configuration.md")
    missing = [n for n in names if f"`{n}`" not in page]
    assert not missing, f"docs/configuration.md does not document these settings: {missing}"


def test_every_simulator_setting_is_documented():
    names = names_in("mpesa_devtools/simulator.py", r'"(MPESA_SIM_[A-Z0-9_]+)"')
    assert names, "the simulator's settings were not found"
    page = read("docs/simulator.md")
    missing = [n for n in names if f"`{n}`" not in page]
    assert not missing, f"docs/simulator.md does not document these settings: {missing}"


def test_slugs_follow_github():
    # The rules the anchors above are checked with, on headings these pages use.
    assert slugify(heading_text("Starting a payment: `POST /stkpush`")) == \
        "starting-a-payment-post-stkpush"
    assert slugify(heading_text("Start-up and `--check-config` messages")) == \
        "start-up-and---check-config-messages"
    assert slugify(heading_text("Daraja's answers")) == "darajas-answers"
    assert slugify(heading_text("Sizing: threads and push slots")) == \
        "sizing-threads-and-push-slots"
    assert [s for _, _, s in headings("# A\n## Notes\n```\n## Not a heading\n```\n## Notes\n")] \
        == ["a", "notes", "notes-1"]


def health_example(rel):
    """The `/health` answer a page shows: the `# {…}` comment lines after its curl line."""
    lines = read(rel).splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("curl -s")
                 and line.rstrip().endswith("/health"))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("#"):
            break
        body.append(line[1:].strip())
    import json

    return json.loads("".join(body))


@pytest.fixture
def demo_health(sim, tmp_path):
    """What `/health` answers in the demo (reconciler and webhooks on), as the pages show."""
    import config
    import mpesa_wsgi
    from helpers import free_port
    from mpesa_devtools import demo
    from webtest import TestApp

    port = free_port()
    cert = tmp_path / "sim.pem"
    cert.write_bytes(sim.sim.initiator_certificate_pem())
    env = demo.demo_environment({"GATEWAY_DB": str(tmp_path / "demo.db")}, port,
                                int(sim.url.rsplit(":", 1)[1]), "demo_" + "k" * 24, "s" * 32,
                                cert)
    app = mpesa_wsgi.create_app(config.load_config(env))
    try:
        yield TestApp(app).get("/health", status=200).json
    finally:
        app.services.close()


@pytest.mark.parametrize("rel", ["README.md", os.path.join("docs", "operations.md")])
def test_the_health_example_shows_what_the_gateway_answers(rel, demo_health):
    """The example's keys, and its checks' keys, are the ones the demo's gateway returns."""
    shown, real = health_example(rel), demo_health
    assert set(shown) == set(real)
    assert set(shown["checks"]) == set(real["checks"]), rel
    assert shown["version"] == real["version"]
