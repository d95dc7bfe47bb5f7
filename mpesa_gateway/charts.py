"""Charts drawn on the server: inline SVG, no chart library in the browser, no script.

Owns `daily_bars`: payments per day as bars stacked by status (one colour each, named in
a legend), with a title and a description a screen reader reads; the numbers themselves
go in a table beside it (the console's), so nothing is only in the picture.
"""

from mpesa_gateway.pages import h

COLOURS = (("succeeded", "#1a7f37"), ("pending", "#6b7280"), ("unknown", "#b7791f"),
           ("failed", "#c53030"), ("rejected", "#7b341e"))
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 260, 40, 40, 30


def daily_bars(days, totals, title):
    """An SVG of `totals` ({(day, status): count}) over `days` (YYYY-MM-DD, oldest first)."""
    per_day = [{s: totals.get((day, s), 0) for s, _ in COLOURS} for day in days]
    peak = max([sum(d.values()) for d in per_day] + [1])
    plot_w, plot_h = WIDTH - LEFT - 10, HEIGHT - BOTTOM - TOP
    slot = plot_w / max(len(days), 1)
    bars = []
    for i, (day, counts) in enumerate(zip(days, per_day)):
        y = TOP + plot_h
        for status, colour in COLOURS:
            n = counts[status]
            if not n:
                continue
            height = plot_h * n / peak
            y -= height
            bars.append(h("rect", {"x": f"{LEFT + i * slot + slot * 0.15:.1f}",
                                   "y": f"{y:.1f}", "width": f"{slot * 0.7:.1f}",
                                   "height": f"{height:.1f}", "fill": colour},
                          h("title", None, f"{day}: {n} {status}")))
        if len(days) <= 7 or i % 5 == 0 or i == len(days) - 1:
            bars.append(h("text", {"x": f"{LEFT + i * slot + slot / 2:.1f}",
                                   "y": f"{HEIGHT - BOTTOM + 16}", "font-size": "11",
                                   "text-anchor": "middle", "fill": "#333"}, day[5:]))
    axis = [h("line", {"x1": LEFT, "y1": TOP + plot_h, "x2": WIDTH - 10, "y2": TOP + plot_h,
                       "stroke": "#888"}),
            h("text", {"x": LEFT - 6, "y": TOP + 4, "font-size": "11", "text-anchor": "end",
                       "fill": "#333"}, str(peak)),
            h("text", {"x": LEFT - 6, "y": TOP + plot_h, "font-size": "11",
                       "text-anchor": "end", "fill": "#333"}, "0")]
    legend = [item for n, (status, colour) in enumerate(COLOURS) for item in (
        h("rect", {"x": LEFT + n * 110, "y": 6, "width": 12, "height": 12, "fill": colour}),
        h("text", {"x": LEFT + n * 110 + 16, "y": 16, "font-size": "12", "fill": "#333"},
          status))]
    total = sum(sum(d.values()) for d in per_day)
    return h("svg", {"xmlns": "http://www.w3.org/2000/svg", "role": "img",
                     "viewBox": f"0 0 {WIDTH} {HEIGHT}", "width": WIDTH, "height": HEIGHT,
                     "aria-labelledby": "chart-title chart-desc"},
             h("title", {"id": "chart-title"}, title),
             h("desc", {"id": "chart-desc"},
               f"{total} payments over {len(days)} days; the table below gives each day's"
               " numbers."),
             legend, axis, bars)
