// The feature browser: a paged feature list (search by token, sort by density or max) and a
// feature page (statistics, activation histogram, examples coloured by activation, logits, the
// logit histogram, nearest and co-firing features, neuron alignment, the activation intervals
// with their shares).
//
// Data arrive as scripts, not fetch(), so the site also works from file://, and in chunks, so
// that no view loads more than its own files, whatever the number of features
// (sae_assets/core/features/site_index.py writes them):
//   site-meta.js            window.SAE_SITE_META = {dictionary, n_tokens, hist_edges, features, live, chunk,
//                           chunks, orders, search_buckets, ...}
//   index-<n>.js            SAE_SITE.chunk("index-<n>", rows n*chunk.. in feature order); a row is
//                           [id, density, max, [top tokens]]
//   by-<order>-<n>.js       the same rows sorted by density or max (high first): page n of that order
//   search-<b>.js           [[key, first posting row, count], ...] for the search keys hashed to bucket b
//   tokens-<n>.js           posting rows n*chunk..: each key's features, keys in sorted order
//   feature-<id>.js         SAE_SITE.feature({...one feature document...}, lineage, closest), id zero-padded
//                           to 6 digits; closest: [[dictionary position, feature, cosine], ...], the
//                           feature's closest feature in each other served dictionary
//   site-dictionaries.js    window.SAE_SITE_DICTIONARIES = [{key, page, features, hook, target_hook}, ...]:
//                           the served dictionaries, for the picker. The first's files are named as
//                           above and its page is index.html; each other's carry the prefix META.prefix
//                           (`<slug>__`), and its page `<slug>__index.html` loads its own site-meta.
// A search key is a top token trimmed of ASCII whitespace and lower-cased; its bucket is FNV-1a
// of its UTF-16 code units, as in site_index.py. Every string from the corpus reaches the page
// through textContent or createTextNode, never innerHTML: tokens are text, whatever they contain.
(function () {
  "use strict";
  var META = window.SAE_SITE_META;
  var DICTIONARIES = window.SAE_SITE_DICTIONARIES || [];
  var PREFIX = (META && META.prefix) || "";  // this dictionary's data files' prefix
  var pendingFeature = {}, features = {};
  var chunks = {}, loadedOrder = [], waiting = {};  // loaded chunks by name; callbacks waiting for a script
  var page = 0, generation = 0, searchTimer = null;  // a list render drops its result if a newer one began

  var el = window.SAE_UI.el, fmt = window.SAE_UI.fmt;  // site-views.js, loaded first

  function pad(id) { var s = String(id); while (s.length < 6) s = "0" + s; return s; }

  function visible(token) { return token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }

  // --- data scripts ---------------------------------------------------------------------------
  function loadScript(src, fail) {
    var script = el("script", {src: src});
    script.onerror = fail;
    document.body.appendChild(script);
  }

  function loadChunk(name, done, fail) {
    if (Object.prototype.hasOwnProperty.call(chunks, name)) return done(chunks[name]);
    if (waiting[name]) return waiting[name].push([done, fail]);
    waiting[name] = [[done, fail]];
    loadScript(PREFIX + name + ".js", function () {
      var callbacks = waiting[name] || [];
      delete waiting[name];
      callbacks.forEach(function (c) { c[1](name + ".js"); });
    });
  }

  function loadChunks(names, done, fail) {
    var got = [], left = names.length;
    names.forEach(function (name, i) {
      loadChunk(name, function (data) { got[i] = data; if (--left === 0) done(got); }, fail);
    });
  }

  window.SAE_SITE = {
    chunk: function (name, data) {
      chunks[name] = data;
      loadedOrder.push(name);
      if (loadedOrder.length > 64) delete chunks[loadedOrder.shift()];  // paging far keeps memory bounded
      var callbacks = waiting[name] || [];
      delete waiting[name];
      callbacks.forEach(function (c) { c[0](data); });
    },
    feature: function (doc, lineage, closest) {  // lineage: the range's provenance (core/features/changes.py)
      if (lineage) doc.lineage = lineage;
      if (closest) doc.closest = closest;
      features[doc.feature] = doc;
      var done = pendingFeature[doc.feature];
      delete pendingFeature[doc.feature];
      if (done) done(doc);
    }
  };

  // --- the feature list -----------------------------------------------------------------------
  function searchKey(text) { return text.replace(/^[ \t\n\r\f\v]+|[ \t\n\r\f\v]+$/g, "").toLowerCase(); }

  function bucketOf(key, buckets) {
    var h = 0x811c9dc5;
    for (var i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193) >>> 0;
    return h % buckets;
  }

  // Each page source calls done(rows, total, pages, page) with the rows of one page only.
  function browsePage(done, fail) {
    var sort = document.getElementById("sort").value, hideDead = document.getElementById("hide-dead").checked;
    var sorted = sort !== "feature";  // dead features (density 0) come last in both sorted orders
    var total = sorted && hideDead ? META.live : META.features;
    var pages = Math.max(1, Math.ceil(total / META.chunk)), p = Math.min(page, pages - 1);
    if (!total) return done([], total, pages, p);
    loadChunk((sorted ? "by-" + sort + "-" : "index-") + p, function (rows) {
      done(hideDead ? rows.filter(function (r) { return r[1] !== 0; }) : rows, total, pages, p);
    }, fail);
  }

  function searchPage(key, done, fail) {
    loadChunk("search-" + bucketOf(key, META.search_buckets), function (entries) {
      var hit = entries.find(function (e) { return e[0] === key; });
      if (!hit) return done([], 0, 1, 0);
      var size = META.chunk, pages = Math.ceil(hit[2] / size), p = Math.min(page, pages - 1);
      var lo = hit[1] + p * size, hi = Math.min(hit[1] + hit[2], lo + size), names = [];
      for (var c = Math.floor(lo / size); c <= Math.floor((hi - 1) / size); c++) names.push("tokens-" + c);
      loadChunks(names, function (parts) {
        var rows = [].concat.apply([], parts), base = Math.floor(lo / size) * size;
        done(rows.slice(lo - base, hi - base), hit[2], pages, p);
      }, fail);
    }, fail);
  }

  function renderList() {
    var mine = ++generation, key = searchKey(document.getElementById("search").value);
    document.body.setAttribute("data-loaded", "loading");
    document.getElementById("sort").disabled = !!key;  // matches come in feature order, a page at a time
    var show = function (rows, total, pages, p) {
      if (mine !== generation) return;
      page = p;
      showRows(rows);
      var what = key ? total + " features with top token \u201c" + key + "\u201d" : total + " features";
      document.getElementById("count").textContent = rows.length + " shown \u00b7 " + what +
        (pages > 1 ? " \u00b7 page " + (p + 1) + " of " + pages : "");
      pager(p, pages);
      document.body.setAttribute("data-query", key);
      document.body.setAttribute("data-loaded", key ? "search" : "list");
    };
    var fail = function (file) {
      if (mine === generation) document.getElementById("count").textContent = file + " is missing: rematerialize feature_site";
    };
    if (key) searchPage(key, show, fail); else browsePage(show, fail);
  }

  function showRows(rows) {
    var body = document.querySelector("#features tbody");
    body.textContent = "";
    rows.forEach(function (r) {
      var tokens = el("td", {}, r[3].map(function (t) { return el("span", {"class": "chip", text: visible(t)}); }));
      var tr = el("tr", {"class": "row", "data-feature": String(r[0])}, [
        el("td", {}, [el("a", {href: "#feature=" + r[0], text: String(r[0])})]),
        el("td", {"class": "num", text: fmt(r[1])}),
        el("td", {"class": "num", text: fmt(r[2])}),
        tokens]);
      tr.addEventListener("click", function () { location.hash = "feature=" + r[0]; });
      body.appendChild(tr);
    });
  }

  function pager(p, pages) {
    var bar = document.getElementById("pager");
    bar.textContent = "";
    if (pages <= 1) return;
    [["\u2039 previous", p - 1, p > 0], ["next \u203a", p + 1, p < pages - 1]].forEach(function (b) {
      var button = el("button", {text: b[0], "data-page": String(b[1])});
      button.disabled = !b[2];
      button.addEventListener("click", function () { page = b[1]; renderList(); window.scrollTo(0, 0); });
      bar.appendChild(button);
    });
  }

  // --- a feature page -------------------------------------------------------------------------
  function loadFeature(id, done) {
    if (features[id]) return done(features[id]);
    pendingFeature[id] = done;
    loadScript(PREFIX + "feature-" + pad(id) + ".js", function () { delete pendingFeature[id]; showError("no data for feature " + id); });
  }

  function showError(message) {
    var view = document.getElementById("feature-view");
    view.textContent = "";
    view.appendChild(el("p", {text: message}));
  }

  // A special token (BOS/EOS/padding: example.special lists its window positions) shows as a chip
  // of class "special"; with special_tokens.exclude on, no feature is ranked by it.
  function tokenSpan(token, act, max, isCenter, isSpecial) {
    var span = el("span", {"class": "tok" + (isCenter ? " center" : "") + (isSpecial ? " special" : ""),
                           title: token.length ? fmt(act) : ""});
    span.setAttribute("data-act", String(act));
    var parts = token.split("\n");
    parts.forEach(function (part, i) {
      if (i > 0) { span.appendChild(el("span", {"class": "nl", text: "\u21b5"})); span.appendChild(document.createTextNode("\n")); }
      if (part) span.appendChild(document.createTextNode(part));
    });
    if (act > 0 && max > 0) span.style.backgroundColor = "rgba(247, 144, 9, " + Math.min(1, 0.12 + 0.88 * act / max).toFixed(3) + ")";
    return span;
  }

  function exampleRow(example, max) {
    var row = el("div", {"class": "example"}, [el("span", {"class": "value", text: fmt(example.activation)})]);
    var special = example.special || [];
    example.tokens.forEach(function (t, i) {
      row.appendChild(tokenSpan(t, example.acts[i], max, i === example.center, special.indexOf(i) >= 0));
    });
    return row;
  }

  function histogram(counts, edges, cls) {
    var first = counts.findIndex(function (c) { return c > 0; });
    if (first < 0) return el("p", {text: "never fired"});
    var last = counts.length - 1;
    while (counts[last] === 0) last--;
    var ns = "http://www.w3.org/2000/svg", w = cls ? 300 : 560, h = 120, n = last - first + 1, peak = Math.max.apply(null, counts);
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", cls || "hist");
    svg.setAttribute("width", w); svg.setAttribute("height", h + 18);
    for (var i = first; i <= last; i++) {
      var bar = document.createElementNS(ns, "rect"), bh = Math.max(1, h * counts[i] / peak);
      bar.setAttribute("x", (i - first) * w / n); bar.setAttribute("width", Math.max(1, w / n - 1));
      bar.setAttribute("y", h - bh); bar.setAttribute("height", bh);
      var tip = document.createElementNS(ns, "title");
      tip.textContent = fmt(edges[i]) + " \u2013 " + fmt(edges[i + 1]) + ": " + counts[i];
      bar.appendChild(tip);
      svg.appendChild(bar);
    }
    [[0, edges[first]], [w - 40, edges[last + 1]]].forEach(function (p) {
      var label = document.createElementNS(ns, "text");
      label.setAttribute("x", p[0]); label.setAttribute("y", h + 14); label.textContent = fmt(p[1]);
      svg.appendChild(label);
    });
    return svg;
  }

  function logitTable(title, rows) {
    return el("div", {}, [el("h3", {text: title}), el("table", {"class": "logits"}, rows.map(function (r) {
      return el("tr", {}, [el("td", {}, [el("span", {"class": "chip", text: visible(r[0])})]), el("td", {text: fmt(r[1])})]);
    }))]);
  }

  // The weight panels: logit histogram, nearest features by decoder cosine, features co-firing on
  // the top examples (with the share of those examples), the model dimensions the decoder weighs most.
  function numberTable(id, title, head, rows) {
    var table = el("table", {"class": "panel"}, [el("tr", {}, head.map(function (h) { return el("th", {text: h}); }))]);
    rows.forEach(function (cells) {
      table.appendChild(el("tr", {}, cells.map(function (c) { return el("td", {"class": "num"}, [c]); })));
    });
    return el("section", {id: id}, [el("h3", {text: title}), rows.length ? table : el("p", {text: "none"})]);
  }

  function weightPanels(doc) {
    var near = (doc.neighbours || []).map(function (n) {
      return [el("a", {href: "#feature=" + Number(n[0]), text: String(n[0])}), fmt(n[1])];
    });
    var cofiring = (doc.cofiring || []).map(function (c) {
      return [el("a", {href: "#feature=" + Number(c[0]), text: String(c[0])}), (100 * c[1]).toFixed(0) + "%"];
    });
    var aligned = (doc.neuron_alignment || []).map(function (a) {
      return [String(a[0]), fmt(a[1]), (100 * a[2]).toFixed(1) + "%"];
    });
    var hist = doc.logit_histogram, logitHist = el("section", {id: "logit-histogram"}, [
      el("h3", {text: "Logit effects over the vocabulary"}),
      hist && hist.counts.length ? histogram(hist.counts, hist.edges, "hist logit") : el("p", {text: "none"})]);
    return el("div", {"class": "columns four"}, [logitHist,
      numberTable("neighbours", "Nearest features (decoder cosine)", ["feature", "cosine"], near),
      numberTable("cofiring", "Co-firing on top examples (same feature range)", ["feature", "of examples"], cofiring),
      numberTable("neuron-alignment", "Neuron alignment", ["dimension", "weight", "of L1"], aligned)]);
  }

  // SAEDashboard's quantile groups: the equal-width intervals of (0, max], highest first, each
  // titled with its range and its share of the feature's non-zero activations (an estimate says
  // so: core/features/intervals.py), then its examples.
  function intervals(doc) {
    var section = el("section", {id: "level-examples"}, [el("h3", {text: "Activation intervals"})]);
    if (doc.levels.some(function (l) { return l.share !== undefined && !l.exact; })) {
      section.appendChild(el("p", {"class": "muted share-note", text: "\u2248 estimated from the activation " +
        "histogram's exact bin counts, the bin an interval's edge cuts spread evenly over its range; " +
        "the other shares are exact"}));
    }
    doc.levels.forEach(function (level) {
      var share = level.share === undefined ? "" :  // a document from before the shares
        " \u00b7 contains " + (level.exact ? "" : "\u2248") + (100 * level.share).toFixed(3) + "%";
      var title = "Interval " + fmt(level.low) + " \u2013 " + fmt(level.high) + share;
      var group = el("div", {"class": "interval", "data-level": String(level.level)},
                     [el("div", {"class": "level-title", text: title})]);
      level.examples.forEach(function (e) { group.appendChild(exampleRow(e, doc.max)); });
      if (!level.examples.length) group.appendChild(el("div", {"class": "muted", text: "no example kept here"}));
      section.appendChild(group);
    });
    return section;
  }

  // The closest feature of each other served dictionary (feature_matches: the highest cosine
  // between decoder rows, exact), linking to that dictionary's page of it.
  function closestPanel(doc) {
    var rows = (doc.closest || []).filter(function (c) { return DICTIONARIES[c[0]]; }).map(function (c) {
      var other = DICTIONARIES[c[0]];
      return [el("span", {"class": "dictionary-key", text: String(other.key)}),
              el("a", {href: other.page + "#feature=" + Number(c[1]), text: String(c[1])}), fmt(c[2])];
    });
    if (!rows.length) return null;
    return numberTable("closest", "Closest feature in each other dictionary (decoder cosine)",
                       ["dictionary", "feature", "cosine"], rows);
  }

  function picker() {  // the dictionary picker: each served dictionary's page
    if (DICTIONARIES.length < 2) return;
    var select = document.getElementById("dictionary-picker");
    DICTIONARIES.forEach(function (d) {
      var failed = (d.failed_checks || []).length ? " \u00b7 failed " + d.failed_checks.join(", ") : "";
      var option = el("option", {text: d.key + " \u00b7 " + d.features + " features" + failed});
      option.value = d.page;
      option.selected = d.key === META.dictionary;
      select.appendChild(option);
    });
    // A page restored by Back keeps the select's last choice: show this page's own again.
    window.addEventListener("pageshow", function () { select.value = DICTIONARIES.filter(function (d) {
      return d.key === META.dictionary; }).map(function (d) { return d.page; })[0] || select.value; });
    select.addEventListener("change", function () {  // the same view there, except a feature id of this one
      var keep = /^#(overview|changes|map)$/.test(location.hash) ? location.hash : "";
      location.href = select.value + keep;
    });
    document.getElementById("picker").hidden = false;
  }

  function lineageLine(l) {  // where this page comes from: dictionary version, data shards, when
    var short = function (v) { return v ? String(v).slice(0, 12) : "\u2013"; };
    return el("div", {"class": "lineage", id: "lineage"}, [
      el("span", {}, ["dictionary ", el("b", {text: String(l.dictionary)}), " v" + short(l.dictionary_version)]),
      el("span", {}, ["examples from ", el("b", {text: l.shards || "unknown shards"})]),
      el("span", {}, ["computed ", el("b", {text: l.computed || "\u2013"})]),
      el("span", {}, ["pages v" + short(l.site_json_version) + " \u00b7 ", el("a", {href: "#changes", text: "what changed"})])]);
  }

  function renderFeature(doc) {
    var view = document.getElementById("feature-view");
    view.textContent = "";
    view.appendChild(el("h2", {text: "Feature " + doc.feature}));
    view.appendChild(el("div", {"class": "stats"}, [
      el("span", {}, ["density ", el("b", {text: fmt(doc.density)})]),
      el("span", {}, ["fired on ", el("b", {text: String(doc.count)}), " tokens"]),
      el("span", {}, ["max ", el("b", {text: fmt(doc.max)})]),
      el("span", {}, ["mean when active ", el("b", {text: fmt(doc.mean)})])]));
    if (doc.lineage) view.appendChild(lineageLine(doc.lineage));
    view.appendChild(el("h3", {text: "Activation histogram (log-spaced bins)"}));
    view.appendChild(histogram(doc.histogram, META.hist_edges));
    view.appendChild(el("div", {"class": "columns"}, [logitTable("Promoted tokens", doc.logits.top),
                                                      logitTable("Suppressed tokens", doc.logits.bottom)]));
    view.appendChild(weightPanels(doc));
    var closest = closestPanel(doc);
    if (closest) view.appendChild(closest);
    var top = el("section", {id: "top-examples"}, [el("h3", {text: "Top activations"})]);
    doc.top.forEach(function (e) { top.appendChild(exampleRow(e, doc.max)); });
    view.appendChild(top);
    view.appendChild(intervals(doc));
    var random = el("section", {id: "random-examples"}, [el("h3", {text: "Random activating tokens"})]);
    doc.random.forEach(function (e) { random.appendChild(exampleRow(e, doc.max)); });
    view.appendChild(random);
  }

  function route() {
    var match = /^#feature=(\d+)$/.exec(location.hash), overview = location.hash === "#overview";
    var changes = location.hash === "#changes", map = location.hash === "#map";
    document.getElementById("list-view").hidden = !!match || overview || changes || map;
    document.getElementById("feature-view").hidden = !match;
    document.getElementById("overview-view").hidden = !overview;
    document.getElementById("changes-view").hidden = !changes;
    document.getElementById("map-view").hidden = !map;
    if (overview) {  // site-views.js: loads dictionary-overview.js and nothing else
      window.SAE_OVERVIEW.show(document.getElementById("overview-view"));
    } else if (changes) {  // site-views.js: loads site-changes.js and nothing else
      window.SAE_CHANGES.show(document.getElementById("changes-view"));
    } else if (map) {  // site-map.js: loads dictionary-map.js and nothing else
      window.SAE_MAP.show(document.getElementById("map-view"));
    } else if (match) {  // a feature page loads its own script and nothing of the list
      var view = document.getElementById("feature-view");
      view.textContent = "loading\u2026";
      loadFeature(parseInt(match[1], 10), function (doc) { renderFeature(doc); document.body.setAttribute("data-loaded", String(doc.feature)); });
    } else {
      renderList();
    }
  }

  function tooltip() {
    var tip = el("div", {id: "tooltip"});
    document.body.appendChild(tip);
    document.addEventListener("mouseover", function (e) {
      var t = e.target.closest ? e.target.closest(".tok") : null;
      if (!t) { tip.style.display = "none"; return; }
      tip.textContent = "activation " + fmt(parseFloat(t.getAttribute("data-act")));
      tip.style.display = "block";
    });
    document.addEventListener("mousemove", function (e) { tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; });
  }

  if (!META) { document.body.textContent = "site-meta.js is missing: rematerialize the feature_site asset."; return; }
  document.getElementById("subtitle").textContent = META.dictionary + " \u00b7 " + META.features +
    " features \u00b7 " + META.n_tokens + " tokens";
  document.getElementById("search").addEventListener("input", function () {
    clearTimeout(searchTimer);  // one search when typing pauses, not one per keystroke
    searchTimer = setTimeout(function () { page = 0; renderList(); }, 150);
  });
  ["sort", "hide-dead"].forEach(function (id) {  // "change": fired by every browser for selects and checkboxes
    document.getElementById(id).addEventListener("change", function () { page = 0; renderList(); });
  });
  window.addEventListener("hashchange", route);
  tooltip();
  picker();
  route();
})();
