"""Server-rendered HTML for people: escaped by default, one layout, the headers that keep
a page safe.

Owns `Markup` and `esc` (every value is text unless it is Markup, which only this
module's builders make), the element builder `h`, tables with real headers, labelled
form fields, the page shell (skip link, nav, who is signed in, the sign-out form), the
console's stylesheet, and the headers every page carries: a strict
Content-Security-Policy (no script at all, nothing from another origin, no framing),
nosniff, no referrer, no caching. Standard library only: the pages are few and plain.
"""

import html

CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
       " frame-ancestors 'none'; base-uri 'none'")
HEADERS = (("Content-Type", "text/html; charset=utf-8"),
           ("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
           ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
           ("Cache-Control", "no-store"))
NAV = (("/console/payments", "Payments"), ("/console/receipts", "Receipts"),
       ("/console/links", "Payment links"),
       ("/console/attention", "Needs attention"), ("/console/summary", "Summary"))


class Markup(str):
    """Text that is already HTML: made only by the builders below."""

    __slots__ = ()


def esc(value):
    """HTML for a value: Markup as it is, anything else as escaped text (None: empty)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def h(tag, attrs=None, *children):
    """An element: attribute values and children escaped (children may be Markup or lists
    of them); an attribute whose value is None is left out, True writes its bare name."""
    parts = [tag]
    for name, value in (attrs or {}).items():
        if value is True:
            parts.append(name)
        elif value is not None and value is not False:
            parts.append(f'{name}="{esc(value)}"')
    inner = "".join(_flat(children))
    return Markup(f"<{' '.join(parts)}>{inner}</{tag}>")


def void(tag, attrs):
    """An element with no content (input, meta, link)."""
    parts = [tag] + [name if value is True else f'{name}="{esc(value)}"'
                     for name, value in attrs.items() if value is not None and value is not False]
    return Markup(f"<{' '.join(parts)}>")


def _flat(children):
    for child in children:
        if isinstance(child, (list, tuple)):
            yield from _flat(child)
        else:
            yield esc(child)


def table(table_id, caption, headers, rows, empty="Nothing to show."):
    """A real table: a caption, column headers (th scope=col), one tr per row; inside a
    scrolling box so a narrow screen never scrolls the page; on a phone each row reads as
    a card, every cell with its column's name (data-label)."""
    if not rows:
        return h("p", {"class": "empty"}, empty)
    return h("div", {"class": "scroll", "role": "region", "aria-label": caption,
                     "tabindex": "0"},
             # (Roles spelt out: a phone's card layout must not cost a screen reader the
             # table.)
             h("table", {"id": table_id, "role": "table"},
               h("caption", None, caption),
               h("thead", {"role": "rowgroup"},
                 h("tr", {"role": "row"},
                   [h("th", {"scope": "col", "role": "columnheader"}, c) for c in headers])),
               h("tbody", {"role": "rowgroup"},
                 [h("tr", {"role": "row"}, [h("td", {"data-label": label, "role": "cell"},
                                              cell) for label, cell in zip(headers, row)])
                  for row in rows])))


def field(name, label, value="", kind="text", **attrs):
    """A labelled input."""
    return h("div", {"class": "field"}, h("label", {"for": name}, label),
             void("input", dict({"id": name, "name": name, "type": kind,
                                 "value": value or None}, **attrs)))


def select(name, label, options, chosen=(), multiple=False):
    return h("div", {"class": "field"}, h("label", {"for": name}, label),
             h("select", {"id": name, "name": name, "multiple": multiple,
                          "size": len(options) if multiple else None},
               [h("option", {"value": value, "selected": value in chosen}, text)
                for value, text in options]))


def link(href, text, **attrs):
    return h("a", dict({"href": href}, **attrs), text)


def document(title, content, person=None, status=200, headers=()):
    """A whole page as (status, body bytes, headers): the shell around `content`."""
    if person is not None:
        top = h("header", None,
                h("a", {"class": "skip", "href": "#main"}, "Skip to content"),
                h("nav", {"aria-label": "Console"},
                  h("ul", None, [h("li", None, link(href, text)) for href, text in NAV])),
                h("p", {"class": "who"}, "Signed in as ",
                  h("strong", {"id": "who"}, person.name),
                  f" (reads {'every owner' if person.owner is None else person.owner})"),
                h("form", {"id": "sign-out", "method": "post", "action": "/console/sign-out"},
                  h("button", {"type": "submit"}, "Sign out")))
    else:
        top = h("header", None, h("p", {"class": "brand"}, "mpesa-wsgi console"))
    body = Markup("<!doctype html>") + h(
        "html", {"lang": "en"},
        h("head", None, void("meta", {"charset": "utf-8"}),
          void("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
          h("title", None, f"{title} · mpesa-wsgi console"),
          void("link", {"rel": "stylesheet", "href": "/console/style.css"})),
        h("body", None, top, h("main", {"id": "main"}, h("h1", None, title), content)))
    return status, body.encode("utf-8"), HEADERS + tuple(headers)


STYLE = b"""\
*{box-sizing:border-box}
body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 color:#1b1b1b;background:#fafafa}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;padding:.5rem 1rem;
 background:#0b5d1e;color:#fff}
header a,header .who{color:#fff}
nav ul{display:flex;flex-wrap:wrap;gap:.25rem 1rem;list-style:none;margin:0;padding:0}
.skip{position:absolute;left:-999px}.skip:focus{position:static}
main{padding:1rem;max-width:72rem}
h1{font-size:1.4rem;margin:.5rem 0 1rem;overflow-wrap:anywhere}
h2{font-size:1.15rem;margin:1.5rem 0 .5rem}
.scroll{overflow-x:auto;max-width:100%;margin-bottom:1rem}
table{border-collapse:collapse;background:#fff;min-width:100%}
caption{text-align:left;font-weight:600;padding:.25rem 0}
th,td{border:1px solid #d0d0d0;padding:.3rem .5rem;text-align:left;vertical-align:top;
 white-space:nowrap}
td{overflow-wrap:anywhere}
form.filters{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:flex-end;margin-bottom:1rem}
.field{display:flex;flex-direction:column;max-width:100%}
.field input,.field select{font:inherit;padding:.25rem;max-width:100%}
button{font:inherit;padding:.3rem .8rem;cursor:pointer}
#error,.problem{color:#8a1c1c;font-weight:600}
.empty{color:#555}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}
dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}
ol#timeline li{margin-bottom:.4rem;overflow-wrap:anywhere}
svg{max-width:100%;height:auto;background:#fff}
@media (max-width:40rem){
 .scroll table,.scroll tbody,.scroll tr,.scroll td{display:block;min-width:0}
 .scroll thead{position:absolute;left:-9999px}
 .scroll tr{border:1px solid #d0d0d0;margin-bottom:.5rem;background:#fff}
 .scroll td{border:0;white-space:normal;display:grid;grid-template-columns:8rem 1fr;gap:.5rem}
 .scroll td::before{content:attr(data-label);font-weight:600}
}
.status-succeeded{color:#0b5d1e}.status-failed,.status-rejected{color:#8a1c1c}.status-unknown{color:#8a5a00}
"""
