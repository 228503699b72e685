// The feature map (#map): every feature of the dictionary at its place in a seeded 2-D layout of
// the decoder directions (UMAP; sae_assets/core/features/feature_map.py), coloured by log10
// density, the features that never fired in grey. Its data script loads when the map first opens:
//   dictionary-map.js   SAE_MAP.data({dictionary, features, method, grid, codes, log10_low,
//                       log10_high, palette, dead_colour, points})
// `points` is base64 of every feature's x (uint16, little-endian), then every y, then every
// density code (0: never fired; 1..codes span log10_low..log10_high). The points are drawn into
// one <canvas> through ImageData, densest last, in one pass over the features; a grid of cells
// over the layout finds the point under the pointer, so every feature stays reachable at a
// million. Hover: a tooltip with the feature's id and density (text only). Click: #feature=<id>.
// Wheel: zoom about the pointer; drag: pan; double-click: the whole map again.
// Loads after site-views.js (window.SAE_UI) and before app.js, which routes #map here.
(function () {
  "use strict";
  var el = window.SAE_UI.el, fmt = window.SAE_UI.fmt;
  var CELL_SHIFT = 8, CELLS = 256;  // grid cells of 256 x 256 layout units (the layout is 0..65535)
  var HIT_PX = 6, HEIGHT = 640, MARGIN = 12, MAX_ZOOM = 4096;
  var map = null;  // the decoded map being shown: points, colours, draw order, grid, view transform
  var drag = null;  // a press on the map: where the pointer was, whether it has moved (a pan, not a click)
  window.addEventListener("mouseup", function () { setTimeout(function () { drag = null; }, 0); });  // after click

  function decode(d) {
    var text = atob(d.points), n = d.features, bytes = new Uint8Array(text.length), i;
    for (i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    var x = new Uint16Array(n), y = new Uint16Array(n), code = new Uint16Array(n);
    for (i = 0; i < n; i++) {
      x[i] = bytes[2 * i] | bytes[2 * i + 1] << 8;
      y[i] = bytes[2 * (n + i)] | bytes[2 * (n + i) + 1] << 8;
      code[i] = bytes[2 * (2 * n + i)] | bytes[2 * (2 * n + i) + 1] << 8;
    }
    return {doc: d, n: n, x: x, y: y, code: code, lut: palette(d.palette), dead: rgb(d.dead_colour),
            order: drawOrder(code), grid: grid(x, y)};
  }

  function rgb(hex) { return [1, 3, 5].map(function (k) { return parseInt(hex.slice(k, k + 2), 16); }); }

  // 256 colours from the palette's stops, linearly between them: entry t of 255 is the colour of
  // log10 density log10_low + t / 255 x (log10_high - log10_low).
  function palette(stops) {
    var lut = [], s = stops.map(rgb);
    for (var t = 0; t < 256; t++) {
      var at = t / 255 * (s.length - 1), j = Math.min(s.length - 2, Math.floor(at)), f = at - j;
      lut.push([0, 1, 2].map(function (c) { return Math.round(s[j][c] + f * (s[j + 1][c] - s[j][c])); }));
    }
    return lut;
  }

  function colourIndex(code, codes) { return Math.round((code - 1) / (codes - 1) * 255); }

  function density(code) {
    var d = map.doc;
    return code ? Math.pow(10, d.log10_low + (code - 1) / (d.codes - 1) * (d.log10_high - d.log10_low)) : 0;
  }

  // Feature ids by density code, never-fired (code 0) in a bucket of their own first, then the
  // live ones by the code's top byte: the densest are drawn last, on top.
  function drawOrder(code) {
    var counts = new Int32Array(259), order = new Uint32Array(code.length), i;
    var bucket = function (c) { return c ? (c >> 8) + 1 : 0; };
    for (i = 0; i < code.length; i++) counts[bucket(code[i]) + 1]++;
    for (i = 1; i < 259; i++) counts[i] += counts[i - 1];
    for (i = 0; i < code.length; i++) order[counts[bucket(code[i])]++] = i;
    return order;
  }

  // Feature ids bucketed by grid cell (a counting sort): cell c holds items[start[c] .. start[c + 1]).
  function grid(x, y) {
    var start = new Int32Array(CELLS * CELLS + 1), items = new Uint32Array(x.length), i;
    var cell = function (k) { return (y[k] >> CELL_SHIFT) * CELLS + (x[k] >> CELL_SHIFT); };
    for (i = 0; i < x.length; i++) start[cell(i) + 1]++;
    for (i = 1; i <= CELLS * CELLS; i++) start[i] += start[i - 1];
    var next = Int32Array.from(start.subarray(0, CELLS * CELLS));
    for (i = 0; i < x.length; i++) items[next[cell(i)]++] = i;
    return {start: start, items: items};
  }

  // The transform that shows the whole layout: device px = offset + layout units x scale.
  function fit(m) {
    var lo = [65535, 65535], hi = [0, 0];
    for (var i = 0; i < m.n; i++) {
      lo[0] = Math.min(lo[0], m.x[i]); hi[0] = Math.max(hi[0], m.x[i]);
      lo[1] = Math.min(lo[1], m.y[i]); hi[1] = Math.max(hi[1], m.y[i]);
    }
    var w = m.canvas.width, h = m.canvas.height, pad = MARGIN * m.dpr;
    var s = Math.min((w - 2 * pad) / Math.max(1, hi[0] - lo[0]), (h - 2 * pad) / Math.max(1, hi[1] - lo[1]));
    m.fitScale = s;
    m.view = {s: s, ox: (w - (hi[0] - lo[0]) * s) / 2 - lo[0] * s, oy: (h - (hi[1] - lo[1]) * s) / 2 - lo[1] * s};
  }

  function draw(m) {
    var w = m.canvas.width, h = m.canvas.height, ctx = m.canvas.getContext("2d");
    var image = ctx.createImageData(w, h), px = image.data, v = m.view, r = m.size, drawn = 0;
    px.fill(255);
    for (var k = 0; k < m.n; k++) {
      var i = m.order[k], c = m.code[i] ? m.lut[colourIndex(m.code[i], m.doc.codes)] : m.dead;
      var x0 = Math.round(v.ox + m.x[i] * v.s) - (r >> 1), y0 = Math.round(v.oy + m.y[i] * v.s) - (r >> 1);
      if (x0 + r <= 0 || y0 + r <= 0 || x0 >= w || y0 >= h) continue;
      drawn++;
      for (var yy = Math.max(0, y0); yy < Math.min(h, y0 + r); yy++) {
        for (var xx = Math.max(0, x0); xx < Math.min(w, x0 + r); xx++) {
          var at = 4 * (yy * w + xx);
          px[at] = c[0]; px[at + 1] = c[1]; px[at + 2] = c[2];
        }
      }
    }
    ctx.putImageData(image, 0, 0);
    m.canvas.setAttribute("data-drawn", String(drawn));
  }

  // The feature nearest the device pixel (mx, my) within HIT_PX, the one drawn on top on a tie; or -1.
  function hit(m, mx, my) {
    var v = m.view, gx = (mx - v.ox) / v.s, gy = (my - v.oy) / v.s, r = HIT_PX * m.dpr / v.s, best = -1, bestD = r * r;
    var cx0 = Math.max(0, Math.floor((gx - r) / 256)), cx1 = Math.min(CELLS - 1, Math.floor((gx + r) / 256));
    var cy0 = Math.max(0, Math.floor((gy - r) / 256)), cy1 = Math.min(CELLS - 1, Math.floor((gy + r) / 256));
    for (var cy = cy0; cy <= cy1; cy++) {
      for (var cx = cx0; cx <= cx1; cx++) {
        var cell = cy * CELLS + cx;
        for (var k = m.grid.start[cell]; k < m.grid.start[cell + 1]; k++) {
          var i = m.grid.items[k], dx = m.x[i] - gx, dy = m.y[i] - gy, d2 = dx * dx + dy * dy;
          if (d2 < bestD || (d2 === bestD && best >= 0 && m.code[i] > m.code[best])) { best = i; bestD = d2; }
        }
      }
    }
    return best;
  }

  function pointer(m, e) {
    var box = m.canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * m.dpr, (e.clientY - box.top) * m.dpr];
  }

  function mark(m, i) {  // a ring around the feature under the pointer, on the overlay canvas
    var ctx = m.overlay.getContext("2d");
    ctx.clearRect(0, 0, m.overlay.width, m.overlay.height);
    if (i < 0) return;
    ctx.beginPath();
    ctx.arc(m.view.ox + m.x[i] * m.view.s, m.view.oy + m.y[i] * m.view.s, m.size + 3 * m.dpr, 0, 2 * Math.PI);
    ctx.lineWidth = 1.5 * m.dpr;
    ctx.strokeStyle = "#101828";
    ctx.stroke();
  }

  function hover(m, e) {
    var p = pointer(m, e), i = hit(m, p[0], p[1]);
    mark(m, i);
    m.canvas.style.cursor = i >= 0 ? "pointer" : "";
    if (i < 0) { m.tip.style.display = "none"; return; }
    m.tip.textContent = "feature " + i + " \u00b7 " + (m.code[i] ? "density " + fmt(density(m.code[i])) : "never fired");
    m.tip.setAttribute("data-feature", String(i));
    m.tip.style.left = (e.clientX + 12) + "px";
    m.tip.style.top = (e.clientY + 12) + "px";
    m.tip.style.display = "block";
  }

  function zoom(m, e) {
    e.preventDefault();
    var p = pointer(m, e), v = m.view;
    var s = Math.min(m.fitScale * MAX_ZOOM, Math.max(m.fitScale, v.s * Math.pow(2, -e.deltaY / 300)));
    v.ox = p[0] - (p[0] - v.ox) * s / v.s;
    v.oy = p[1] - (p[1] - v.oy) * s / v.s;
    v.s = s;
    draw(m);
    hover(m, e);
  }

  function listen(m) {
    m.canvas.addEventListener("mousedown", function (e) { drag = {x: e.clientX, y: e.clientY, moved: false}; });
    m.canvas.addEventListener("mousemove", function (e) {
      if (drag && e.buttons & 1) {
        var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
        if (drag.moved || Math.abs(dx) + Math.abs(dy) > 3) {
          drag.moved = true;
          m.view.ox += dx * m.dpr; m.view.oy += dy * m.dpr;
          drag.x = e.clientX; drag.y = e.clientY;
          draw(m);
        }
      }
      hover(m, e);
    });
    m.canvas.addEventListener("mouseleave", function () { m.tip.style.display = "none"; mark(m, -1); });
    m.canvas.addEventListener("click", function (e) {
      if (drag && drag.moved) return;
      var p = pointer(m, e), i = hit(m, p[0], p[1]);
      if (i >= 0) location.hash = "feature=" + i;
    });
    m.canvas.addEventListener("wheel", function (e) { zoom(m, e); }, {passive: false});
    m.canvas.addEventListener("dblclick", function () { fit(m); draw(m); });
  }

  function legend(m) {
    var d = m.doc, bar = el("canvas", {"class": "map-scale", width: 256, height: 12});
    var ctx = bar.getContext("2d"), dead = 0;
    m.lut.forEach(function (c, t) { ctx.fillStyle = "rgb(" + c.join(",") + ")"; ctx.fillRect(t, 0, 1, 12); });
    var ticks = el("div", {"class": "map-ticks"});
    for (var e = d.log10_low; e <= d.log10_high; e++) {
      var tick = el("span", {text: "1e" + e});
      tick.style.left = ((e - d.log10_low) / (d.log10_high - d.log10_low) * 256) + "px";
      ticks.appendChild(tick);
    }
    for (var i = 0; i < m.n; i++) if (!m.code[i]) dead++;
    var swatch = el("span", {"class": "map-dead"});
    swatch.style.backgroundColor = "rgb(" + m.dead.join(",") + ")";
    return el("div", {"class": "map-legend"}, [el("span", {text: "log10 density "}),
      el("span", {"class": "map-bar"}, [bar, ticks]), swatch, el("span", {text: "never fired (" + dead + ")"})]);
  }

  function render(view, d) {
    if (!map || map.doc !== d) map = decode(d);
    var m = map, width = Math.max(320, Math.min(1160, view.clientWidth || 900));
    m.dpr = window.devicePixelRatio || 1;
    m.size = Math.max(1, Math.round((m.n > 200000 ? 1 : m.n > 20000 ? 2 : m.n > 2000 ? 3 : 6) * m.dpr));
    m.canvas = el("canvas", {id: "map-canvas", width: Math.round(width * m.dpr), height: Math.round(HEIGHT * m.dpr)});
    m.overlay = el("canvas", {"class": "map-overlay", width: m.canvas.width, height: m.canvas.height});
    [m.canvas, m.overlay].forEach(function (c) { c.style.width = width + "px"; c.style.height = HEIGHT + "px"; });
    m.tip = el("div", {id: "map-tooltip"});
    view.textContent = "";
    view.appendChild(el("h2", {text: "Feature map of " + d.dictionary}));
    view.appendChild(el("p", {"class": "muted", text: d.features + " features placed by " +
      (d.method === "umap" ? "UMAP of their decoder directions (seeded)" :
       "the first two principal components of their decoder directions (too few features for UMAP)") +
      "; hover for a feature, click to open it; wheel zooms, drag pans, double-click shows it all."}));
    view.appendChild(legend(m));
    view.appendChild(el("div", {"class": "map-wrap"}, [m.canvas, m.overlay]));
    view.appendChild(m.tip);
    fit(m);
    draw(m);
    listen(m);
    document.body.setAttribute("data-map", "ready");
  }

  var page = window.SAE_UI.page("dictionary-map.js", render);
  // Where feature `id` is drawn now, in CSS px from the canvas' top-left corner (null: no map shown).
  page.locate = function (id) {
    if (!map || !map.view || id < 0 || id >= map.n) return null;
    return [(map.view.ox + map.x[id] * map.view.s) / map.dpr, (map.view.oy + map.y[id] * map.view.s) / map.dpr];
  };
  window.SAE_MAP = page;
})();
