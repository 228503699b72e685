// Two pages beside app.js's list and feature pages, each loading one data script when opened:
// - the dictionary overview (#overview): the histogram of log10 feature density with the dead
//   and dense counts, L0 and loss recovered, the training curves and the sweep's frontier (L0
//   against loss recovered, this dictionary marked), drawn as inline SVG from
//   dictionary-overview.js (sae_assets/core/features/overview.py);
// - what changed since the previous build (#changes), range by range, and why, from
//   site-changes.js (sae_assets/core/features/changes.py).
// Names, keys and reasons reach the page through textContent, never as markup. This script loads
// before app.js and lends it `el` and `fmt`, and site-map.js `page` too (window.SAE_UI).
(function () {
  "use strict";
  var SVG_NS = "http://www.w3.org/2000/svg";
  var data = null;  // the overview document being drawn

  // Shared with app.js (window.SAE_UI): elements built with text only, and number formatting.
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "class") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { node.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined) return "\u2013";
    if (x === 0) return "0";
    var a = Math.abs(x);
    return a >= 1000 || a < 0.001 ? x.toExponential(2) : x.toPrecision(3);
  }

  // A chart frame: plot area [left, right] x [top, bottom] in a W x H box.
  var W = 420, H = 190, LEFT = 44, RIGHT = W - 8, TOP = 18, BOTTOM = H - 26;

  function scale(lo, hi, a, b) {
    if (!(hi > lo)) { hi = lo + 1; }
    return function (v) { return a + (v - lo) / (hi - lo) * (b - a); };
  }

  function frame(cls, xLabel, yLabel, xTicks, yTicks) {
    var box = svg("svg", {"class": "chart " + cls, width: W, height: H, viewBox: "0 0 " + W + " " + H});
    box.appendChild(svg("line", {x1: LEFT, y1: BOTTOM, x2: RIGHT, y2: BOTTOM, "class": "axis"}));
    box.appendChild(svg("line", {x1: LEFT, y1: TOP, x2: LEFT, y2: BOTTOM, "class": "axis"}));
    xTicks.forEach(function (t) { box.appendChild(svg("text", {x: t[0], y: H - 12, "text-anchor": "middle"}, t[1])); });
    yTicks.forEach(function (t) { box.appendChild(svg("text", {x: LEFT - 4, y: t[0] + 3, "text-anchor": "end"}, t[1])); });
    box.appendChild(svg("text", {x: (LEFT + RIGHT) / 2, y: H - 1, "text-anchor": "middle", "class": "label"}, xLabel));
    box.appendChild(svg("text", {x: 2, y: 9, "class": "label"}, yLabel));
    return box;
  }

  function densityChart(d) {
    var edges = d.log10_edges, counts = d.counts, top = Math.max.apply(null, counts.concat([1]));
    var x = scale(edges[0], edges[edges.length - 1], LEFT, RIGHT), y = scale(0, top, BOTTOM, TOP);
    var xTicks = [];
    edges.forEach(function (e) { if (Math.abs(e - Math.round(e)) < 1e-9) xTicks.push([x(e), "1e" + Math.round(e)]); });
    var box = frame("density", "feature density (log10)", "features", xTicks, [[y(0), "0"], [y(top), String(top)]]);
    counts.forEach(function (c, i) {
      if (!c) return;
      var bar = svg("rect", {x: x(edges[i]) + 0.5, y: y(c), width: Math.max(1, x(edges[i + 1]) - x(edges[i]) - 1),
                             height: BOTTOM - y(c)});
      bar.appendChild(svg("title", {}, c + " features with density 1e" + edges[i].toFixed(2) + " to 1e" +
                                       edges[i + 1].toFixed(2)));
      box.appendChild(bar);
    });
    return box;
  }

  function lineChart(rows, key, label, cls) {
    var pts = rows.filter(function (r) { return typeof r[key] === "number" && typeof r.step === "number"; });
    if (!pts.length) return el("p", {"class": "muted", text: "no " + label + " recorded"});
    var steps = pts.map(function (r) { return r.step; }), vals = pts.map(function (r) { return r[key]; });
    var lo = Math.min.apply(null, vals), hi = Math.max.apply(null, vals);
    var x = scale(steps[0], steps[steps.length - 1], LEFT, RIGHT), y = scale(lo, hi, BOTTOM, TOP);
    var box = frame("curve " + cls, "step", label,
                    [[x(steps[0]), String(steps[0])], [x(steps[steps.length - 1]), String(steps[steps.length - 1])]],
                    [[y(lo), fmt(lo)], [y(hi), fmt(hi)]]);
    box.appendChild(svg("polyline", {points: pts.map(function (r) { return x(r.step).toFixed(1) + "," + y(r[key]).toFixed(1); }).join(" ")}));
    return box;
  }

  function frontierChart(points) {
    var usable = points.filter(function (p) { return p.l0 > 0 && typeof p.loss_recovered_vs_mean === "number"; });
    if (!usable.length) return el("p", {"class": "muted", text: "no sweep point has metrics yet"});
    var logs = usable.map(function (p) { return Math.log10(p.l0); }), ys = usable.map(function (p) { return p.loss_recovered_vs_mean; });
    var x0 = Math.floor(Math.min.apply(null, logs)), x1 = Math.ceil(Math.max.apply(null, logs) + 1e-9);
    var y0 = Math.min(0, Math.min.apply(null, ys)), y1 = Math.max(1, Math.max.apply(null, ys));
    var x = scale(x0, x1, LEFT, RIGHT), y = scale(y0, y1, BOTTOM, TOP);
    var xTicks = [];
    for (var e = x0; e <= x1; e++) xTicks.push([x(e), String(Math.pow(10, e))]);
    var box = frame("frontier", "L0 (log scale)", "loss recovered vs mean ablation", xTicks,
                    [[y(y0), fmt(y0)], [y(y1), fmt(y1)]]);
    usable.forEach(function (p, i) {
      var dot = svg("circle", {cx: x(logs[i]), cy: y(ys[i]), r: p.current ? 6 : 4, "class": p.current ? "current" : "point"});
      dot.appendChild(svg("title", {}, p.point + ": L0 " + fmt(p.l0) + ", loss recovered " + fmt(ys[i]) +
                                        " (vs zero ablation " + fmt(p.loss_recovered) + ")"));
      box.appendChild(dot);
    });
    return box;
  }

  function stat(label, value) { return el("span", {}, [label + " ", el("b", {text: value})]); }

  // How much of this dictionary each other served one has found: per dictionary, the mean of each
  // feature's closest-feature cosine there, and the share of features whose closest reaches 0.9, 0.7, 0.5.
  function agreement(rows) {
    var served = window.SAE_SITE_DICTIONARIES || [], cuts = Object.keys(rows[0].share_at_least);
    var head = ["dictionary", "mean closest cosine"].concat(cuts.map(function (c) { return "share \u2265 " + c; }));
    var table = el("table", {"class": "panel agreement"}, [el("tr", {}, head.map(function (h) { return el("th", {text: h}); }))]);
    rows.forEach(function (r) {
      var other = served[r.position] || {key: "dictionary " + r.position, page: ""};
      var name = other.page ? el("a", {href: other.page + "#overview", text: String(other.key)}) : String(other.key);
      table.appendChild(el("tr", {}, [el("td", {}, [name]), el("td", {"class": "num", text: fmt(r.mean)})].concat(
        cuts.map(function (c) { return el("td", {"class": "num", text: (100 * r.share_at_least[c]).toFixed(1) + "%"}); }))));
    });
    return el("section", {id: "agreement"}, [el("h3", {text: "Closest features in the other dictionaries"}), table]);
  }

  function render(view) {
    var d = data, m = d.metrics || {}, h = d.density;
    view.textContent = "";
    view.appendChild(el("h2", {text: "Dictionary " + d.dictionary}));
    if (d.hook) {  // a transcoder reads one hook and reconstructs another
      view.appendChild(el("p", {"class": "muted hooks", text: d.target_hook ?
        "transcoder: reads " + d.hook + ", reconstructs " + d.target_hook : "reads and reconstructs " + d.hook}));
    }
    view.appendChild(el("div", {"class": "stats"}, [
      stat("features", String(h.features)), stat("dead", String(h.dead)),
      stat("dense (\u2265 " + fmt(h.dense_threshold) + ")", String(h.dense)), stat("L0", fmt(m.l0)),
      stat("loss recovered vs zero ablation", fmt(m.loss_recovered)),
      stat("vs mean ablation", fmt(m.loss_recovered_vs_mean)), stat("FVU", fmt(m.fvu)),
      stat("tokens browsed", String(d.n_tokens))]));
    if (!d.metrics) view.appendChild(el("p", {"class": "muted", text: "sae_metrics has not scored this dictionary yet"}));
    view.appendChild(el("h3", {text: "Feature density"}));
    view.appendChild(densityChart(h));
    view.appendChild(el("h3", {text: "Training"}));
    view.appendChild(el("div", {"class": "curves"}, [lineChart(d.curve, "loss", "loss", "loss"),
      lineChart(d.curve, "l0", "L0", "l0"), lineChart(d.curve, "dead_fraction", "dead fraction", "dead")]));
    if (d.agreement && d.agreement.length) view.appendChild(agreement(d.agreement));
    view.appendChild(el("h3", {text: "The sweep's frontier"}));
    view.appendChild(frontierChart(d.frontier));
    var table = el("table", {"class": "panel frontier-table"}, [el("thead", {}, [el("tr", {}, [
      el("th", {text: "sweep point"}), el("th", {text: "L0"}), el("th", {text: "loss recovered (zero)"}),
      el("th", {text: "loss recovered (mean)"})])])]);
    var body = el("tbody");
    var pages = {};  // the served dictionaries' pages (site-dictionaries.js): their points link there
    (window.SAE_SITE_DICTIONARIES || []).forEach(function (s) { pages[s.key] = s.page; });
    d.frontier.forEach(function (p) {
      var name = !p.current && Object.prototype.hasOwnProperty.call(pages, p.point)
        ? el("a", {href: pages[p.point] + "#overview", text: p.point}) : p.point;
      body.appendChild(el("tr", {"class": p.current ? "current" : ""}, [el("td", {}, [name]), el("td", {"class": "num", text: fmt(p.l0)}),
        el("td", {"class": "num", text: fmt(p.loss_recovered)}), el("td", {"class": "num", text: fmt(p.loss_recovered_vs_mean)})]));
    });
    table.appendChild(body);
    view.appendChild(table);
    document.body.setAttribute("data-overview", "ready");
  }

  function renderChanges(view, c) {
    view.textContent = "";
    view.appendChild(el("h2", {text: "What changed since the previous build"}));
    if (!c.previous_build) {
      view.appendChild(el("p", {"class": "muted", text: "This is the first build of this site: nothing to compare with."}));
    } else if (!c.ranges.length) {
      view.appendChild(el("p", {text: "No feature page changed since build " + String(c.previous_build).slice(0, 12) + "."}));
    } else {
      view.appendChild(el("p", {text: c.changed_features + " feature pages changed, were added or removed since build " +
                                       String(c.previous_build).slice(0, 12) + "."}));
    }
    var list = el("div", {"class": "changes"});
    c.ranges.forEach(function (r) {
      var item = el("div", {"class": "change", "data-range": r.range});
      item.appendChild(el("h3", {text: "Features " + r.range + ": " + r.counts.changed + " changed, " + r.counts.added +
                                        " added, " + r.counts.removed + " removed"}));
      item.appendChild(el("ul", {}, r.reasons.map(function (why) { return el("li", {"class": "reason", text: why}); })));
      [["changed", r.changed], ["added", r.added]].forEach(function (kind) {
        if (!kind[1].length) return;
        var ids = el("div", {"class": "ids " + kind[0]}, [kind[0] + ": "]);
        kind[1].forEach(function (id) { ids.appendChild(el("a", {href: "#feature=" + id, text: String(id)})); });
        if (r.counts[kind[0]] > kind[1].length) ids.appendChild(document.createTextNode("\u2026 and " +
                                                                (r.counts[kind[0]] - kind[1].length) + " more"));
        item.appendChild(ids);
      });
      list.appendChild(item);
    });
    view.appendChild(list);
    document.body.setAttribute("data-changes", "ready");
  }

  // One data script per page, loaded on first open; `render(view, data)` draws it.
  function page(file, render) {
    var data = null, waiting = [];
    return {
      data: function (d) {
        data = d;
        var callbacks = waiting;
        waiting = [];
        callbacks.forEach(function (c) { c(); });
      },
      show: function (view) {
        if (data) return render(view, data);
        view.textContent = "loading\u2026";
        waiting.push(function () { render(view, data); });
        if (waiting.length > 1) return;
        var script = document.createElement("script");
        script.src = ((window.SAE_SITE_META || {}).prefix || "") + file;  // a further dictionary's page: its own files
        script.onerror = function () {
          waiting = [];
          view.textContent = file + " is missing: rematerialize the feature_site asset.";
        };
        document.body.appendChild(script);
      }
    };
  }

  window.SAE_UI = {el: el, fmt: fmt, page: page};  // page: site-map.js loads its data the same way
  window.SAE_CHANGES = page("site-changes.js", renderChanges);
  window.SAE_OVERVIEW = page("dictionary-overview.js", function (view, d) { data = d; render(view); });
})();
