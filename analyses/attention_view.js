/* attnaudit attention view: head view (lines query -> key, one colour per head) and model view (layer x head grid),
   with the audit's evidence beside them. Reads each <div class="aav"> container's <script type="application/json">
   block; builds every piece of text with textContent (never innerHTML). The same text serves every view on a page,
   so one sha256 in the Content-Security-Policy allows it. Made by attnaudit.analyses.attention_view. */
(function () {
  "use strict";
  var T0 = performance.now();
  var SVGNS = "http:/" + "/www.w3.org/2000/svg";   // split so the page holds no URL at all (the report checks)
  var COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#843c39", "#7b4173", "#3182bd"];

  function el(tag, attrs, text) {
    var n = document.createElement(tag);
    for (var k in attrs || {}) n.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }
  function sv(tag, attrs, text) {
    var n = document.createElementNS(SVGNS, tag);
    for (var k in attrs || {}) n.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }
  function bytes(b64) {
    var s = atob(b64 || ""), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  function u16(b64) { var b = bytes(b64); return new Uint16Array(b.buffer, 0, b.length >> 1); }
  function u32(b64) { var b = bytes(b64); return new Uint32Array(b.buffer, 0, b.length >> 2); }
  function colour(h) { return COLOURS[h % COLOURS.length]; }
  function fmt(v) {
    if (v === null || v === undefined) return "not available";
    if (typeof v === "number") return isFinite(v) ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)) : "not available";
    return String(v);
  }
  function clear(n) { while (n.firstChild) n.removeChild(n.firstChild); }

  function decode(p) {
    if (p._d) return p._d;
    p._d = {q: u16(p.edges.q), k: u16(p.edges.k), w: bytes(p.edges.w), start: u32(p.edges.start),
            grid: bytes(p.grid.data)};
    return p._d;
  }

  function init(box) {
    if (box.getAttribute("data-aav-state")) return;
    box.setAttribute("data-aav-state", "starting");
    var src = box.querySelector("script.aav-data");
    var data = JSON.parse(src.textContent);
    var panels = data.panels, ev = data.evidence || {};
    var st = {panel: 0, example: 0, layer: data.layer || 0, heads: null, qs: 0, ks: 0, tied: panels[0].kind !== "cross", minw: 0};
    var p0 = panels[0];
    st.layer = Math.min(Math.max(st.layer, 0), p0.n_layers - 1);
    st.heads = initialHeads(p0, data.head);

    var root = el("div", {"class": "aav-root"});
    var controls = el("div", {"class": "aav-controls"});
    var body = el("div", {"class": "aav-body"});
    var headBox = el("div", {"class": "aav-head"});
    var side = el("div", {"class": "aav-side"});
    var evBox = el("div", {"class": "aav-evidence"});
    var gridBox = el("div", {"class": "aav-grid"});
    var status = el("p", {"class": "aav-status"});
    root.appendChild(controls); root.appendChild(status); body.appendChild(headBox); body.appendChild(side);
    side.appendChild(evBox); side.appendChild(gridBox); root.appendChild(body);
    box.appendChild(root);

    function initialHeads(p, head) {
      var s = {};
      if (head === null || head === undefined) { for (var h = 0; h < p.n_heads; h++) s[h] = true; }
      else s[Math.min(Math.max(head, 0), p.n_heads - 1)] = true;
      return s;
    }
    function panel() { return panels[st.panel]; }
    function activeHeads() {
      var out = [];
      for (var h = 0; h < panel().n_heads; h++) if (st.heads[h]) out.push(h);
      return out;
    }

    // -- controls ----------------------------------------------------------------------------
    // the examples: distinct panel.example ids in order, each with its panels (one per kind of attention)
    var examples = [], byExample = Object.create(null);
    panels.forEach(function (p, i) {
      var x = p.example === undefined || p.example === null ? "" : String(p.example);
      if (!(x in byExample)) { byExample[x] = []; examples.push(x); }
      byExample[x].push(i);
    });
    var exampleSel = el("select", {"class": "aav-example", "aria-label": "example"});
    examples.forEach(function (x, j) {
      exampleSel.appendChild(el("option", {value: String(j)}, panels[byExample[x][0]].example_label || x));
    });
    var panelSel = el("select", {"class": "aav-panel", "aria-label": "attention"});
    function fillPanels() {
      clear(panelSel);
      byExample[examples[st.example]].forEach(function (i) { panelSel.appendChild(el("option", {value: String(i)}, panels[i].name)); });
      panelSel.value = String(st.panel);
    }
    fillPanels();
    var most = Math.max.apply(null, examples.map(function (x) { return byExample[x].length; }));
    var layerSel = el("select", {"class": "aav-layer", "aria-label": "layer"});
    var headBtns = el("span", {"class": "aav-heads"});
    var qStart = el("input", {"class": "aav-qstart", type: "number", min: "0", step: "1", value: "0", "aria-label": "first query row"});
    var kStart = el("input", {"class": "aav-kstart", type: "number", min: "0", step: "1", value: "0", "aria-label": "first key row"});
    var minW = el("input", {"class": "aav-minw", type: "number", min: "0", max: "1", step: "0.01", value: "0", "aria-label": "minimum weight"});
    function label(text, input) { var l = el("label", {}, text + " "); l.appendChild(input); return l; }
    if (examples.length > 1) controls.appendChild(label("Example", exampleSel));
    if (most > 1) controls.appendChild(label("Attention", panelSel));
    controls.appendChild(label("Layer", layerSel));
    controls.appendChild(el("span", {}, "Heads "));
    controls.appendChild(headBtns);
    var allBtn = el("button", {type: "button", "class": "aav-all"}, "all");
    var noneBtn = el("button", {type: "button", "class": "aav-none"}, "none");
    controls.appendChild(allBtn); controls.appendChild(noneBtn);
    controls.appendChild(label("Queries from", qStart));
    var kLabel = label("keys from", kStart);
    controls.appendChild(kLabel);
    controls.appendChild(label("min weight", minW));

    function buildControls() {
      var p = panel();
      clear(layerSel);
      for (var l = 0; l < p.n_layers; l++) layerSel.appendChild(el("option", {value: String(l)}, String(l)));
      layerSel.value = String(st.layer);
      clear(headBtns);
      for (var h = 0; h < p.n_heads; h++) {
        var b = el("button", {type: "button", "class": "aav-hbtn", "data-head": String(h), "aria-pressed": st.heads[h] ? "true" : "false",
                               title: "head " + h}, String(h));
        b.style.borderColor = colour(h);
        b.style.background = st.heads[h] ? colour(h) : "#fff";
        b.style.color = st.heads[h] ? "#fff" : "#222";
        b.addEventListener("click", (function (hh) { return function () { st.heads[hh] = !st.heads[hh]; draw(); }; })(h));
        headBtns.appendChild(b);
      }
      qStart.max = String(Math.max(p.query_tokens.length - 1, 0));
      kStart.max = String(Math.max(p.key_tokens.length - 1, 0));
    }
    function choosePanel(i, keepHeads) {
      var before = panel(); st.panel = i; var p = panel();
      st.layer = Math.min(st.layer, p.n_layers - 1);
      if (!keepHeads || p.n_heads !== before.n_heads) st.heads = initialHeads(p, null);
      st.qs = 0; st.ks = 0; st.tied = p.kind !== "cross";
      qStart.value = "0"; kStart.value = "0"; drawGrid(); draw();
    }
    panelSel.addEventListener("change", function () { choosePanel(+panelSel.value, false); });
    exampleSel.addEventListener("change", function () {   // the same kind of attention, layer and heads, another example
      st.example = +exampleSel.value;
      var own = byExample[examples[st.example]], kind = panel().kind, next = own[0];
      own.forEach(function (i) { if (panels[i].kind === kind && panels[next].kind !== kind) next = i; });
      choosePanel(next, true); fillPanels();
    });
    layerSel.addEventListener("change", function () { st.layer = +layerSel.value; draw(); });
    allBtn.addEventListener("click", function () { for (var h = 0; h < panel().n_heads; h++) st.heads[h] = true; draw(); });
    noneBtn.addEventListener("click", function () { st.heads = {}; draw(); });
    function num(input, lo, hi) { var v = Math.floor(+input.value || 0); return Math.min(Math.max(v, lo), hi); }
    qStart.addEventListener("change", function () {
      st.qs = num(qStart, 0, Math.max(panel().query_tokens.length - 1, 0));
      if (st.tied) { st.ks = Math.min(st.qs, Math.max(panel().key_tokens.length - 1, 0)); kStart.value = String(st.ks); }
      draw();
    });
    kStart.addEventListener("change", function () {   // self-attention keys follow the queries until moved on their own
      st.ks = num(kStart, 0, Math.max(panel().key_tokens.length - 1, 0)); st.tied = false; draw();
    });
    minW.addEventListener("change", function () { st.minw = Math.min(Math.max(+minW.value || 0, 0), 1); draw(); });

    // -- head view ---------------------------------------------------------------------------
    function tokenScores(p, q0, nq) {
      var ts = p.token_scores || ev.token_scores;
      if (!ts || !ts.scores || p.kind === "cross") return [];
      var toks = ts.tokens || [];
      var off = p.query_offset || 0;
      for (var i = 0; i < nq; i++) if (toks[off + q0 + i] !== p.query_tokens[q0 + i]) return [];
      var out = [];
      Object.keys(ts.scores).forEach(function (m) {
        var s = ts.scores[m], mx = 0;
        for (var j = 0; j < s.length; j++) if (s[j] !== null && isFinite(s[j])) mx = Math.max(mx, Math.abs(s[j]));
        out.push({name: m, s: s, mx: mx || 1});
      });
      return out;
    }

    function draw() {
      var t = performance.now();
      var p = panel(), d = decode(p), rows = data.rows, cap = data.max_lines;
      var heads = activeHeads();
      buildControls();
      var nQ = p.query_tokens.length, nK = p.key_tokens.length;
      var q0 = Math.min(st.qs, Math.max(nQ - 1, 0)), q1 = Math.min(q0 + rows, nQ);
      var k0 = Math.min(st.ks, Math.max(nK - 1, 0));
      var k1 = Math.min(k0 + rows, nK);
      var scores = tokenScores(p, q0, q1 - q0);
      // edges of the active heads at this layer inside the window, heaviest first
      var cand = [], outside = 0, light = 0;
      heads.forEach(function (h) {
        var c = st.layer * p.n_heads + h;
        for (var i = d.start[c]; i < d.start[c + 1]; i++) {
          var q = d.q[i], k = d.k[i];
          if (q < q0 || q >= q1 || k < k0 || k >= k1) { outside++; continue; }
          if (d.w[i] / 255 < st.minw) { light++; continue; }
          cand.push(i);
        }
      });
      var capped = 0;
      if (cand.length > cap) {
        cand.sort(function (a, b) { return d.w[b] - d.w[a]; });
        capped = cand.length - cap; cand.length = cap;
      }
      var rowH = 16, colW = 10, sw = scores.length * (colW + 2), textW = 130, gap = 160;
      var xq = sw + textW, xk = xq + gap, width = xk + textW + 10;
      var height = 24 + Math.max(q1 - q0, k1 - k0, 1) * rowH;
      var svg = sv("svg", {"class": "aav-svg", width: String(width), height: String(height),
                           viewBox: "0 0 " + width + " " + height, role: "img",
                           "aria-label": p.name + ", layer " + st.layer + ", heads " + heads.join(" ")});
      svg.appendChild(sv("text", {x: String(xq - 4), y: "12", "text-anchor": "end", "class": "aav-hdr"}, p.query_label));
      svg.appendChild(sv("text", {x: String(xk + 4), y: "12", "class": "aav-hdr"}, p.key_label));
      scores.forEach(function (sc, j) {
        svg.appendChild(sv("text", {x: String(j * (colW + 2) + colW / 2), y: "12", "text-anchor": "middle", "class": "aav-hdr"},
                           sc.name.charAt(0)));
      });
      var lines = sv("g", {"class": "aav-lines"});
      var drawn = [];
      for (var n = 0; n < cand.length; n++) {
        var i = cand[n], w = d.w[i] / 255, h = 0;
        while (d.start[st.layer * p.n_heads + h + 1] <= i) h++;
        var y1 = 24 + (d.q[i] - q0) * rowH - 4, y2 = 24 + (d.k[i] - k0) * rowH - 4;
        var ln = sv("line", {x1: String(xq), y1: String(y1), x2: String(xk), y2: String(y2), stroke: colour(h),
                             "stroke-width": String(0.5 + 2.5 * w), "stroke-opacity": String(Math.max(0.08, w).toFixed(3)),
                             "data-head": String(h), "data-q": String(d.q[i]), "data-k": String(d.k[i])});
        lines.appendChild(ln); drawn.push(ln);
      }
      svg.appendChild(lines);
      function hover(attr, idx, on) {
        for (var m = 0; m < drawn.length; m++) {
          var hit = drawn[m].getAttribute(attr) === String(idx);
          drawn[m].setAttribute("class", on ? (hit ? "aav-hi" : "aav-dim") : "");
        }
      }
      function tokenRow(side, idx, x, y, anchor, text) {
        var tx = sv("text", {x: String(x), y: String(y), "text-anchor": anchor, "class": "aav-tok",
                             "data-side": side, "data-i": String(idx)}, text);
        var attr = side === "q" ? "data-q" : "data-k";
        tx.addEventListener("mouseenter", function () { tx.setAttribute("class", "aav-tok aav-tokhi"); hover(attr, idx, true); });
        tx.addEventListener("mouseleave", function () { tx.setAttribute("class", "aav-tok"); hover(attr, idx, false); });
        tx.appendChild(sv("title", {}, side + idx + ": " + text));
        svg.appendChild(tx);
      }
      for (var a = q0; a < q1; a++) {
        var y = 24 + (a - q0) * rowH;
        tokenRow("q", a, xq - 4, y, "end", p.query_tokens[a]);
        scores.forEach(function (sc, j) {
          var v = sc.s[(p.query_offset || 0) + a], ok = v !== null && v !== undefined && isFinite(v);
          var r = sv("rect", {x: String(j * (colW + 2)), y: String(y - 11), width: String(colW), height: String(rowH - 3),
                              fill: !ok ? "#eee" : (v >= 0 ? "#d62728" : "#1f77b4"),
                              "fill-opacity": String(ok ? (0.1 + 0.9 * Math.abs(v) / sc.mx).toFixed(3) : 1), "class": "aav-score",
                              "data-method": sc.name});
          r.appendChild(sv("title", {}, sc.name + " score of " + p.query_tokens[a] + ": " + fmt(ok ? v : null)));
          svg.appendChild(r);
        });
      }
      for (var b = k0; b < k1; b++) tokenRow("k", b, xk + 4, 24 + (b - k0) * rowH, "start", p.key_tokens[b]);
      clear(headBox);
      headBox.appendChild(svg);
      svg.setAttribute("data-lines", String(drawn.length));
      box.setAttribute("data-layer", String(st.layer));
      box.setAttribute("data-heads", heads.join(","));
      box.setAttribute("data-panel", String(st.panel));
      box.setAttribute("data-example", examples[st.example]);
      var msg = (examples[st.example] ? "example " + examples[st.example] + " · " : "") + p.name + " · layer " + st.layer + " · " + (heads.length ? "heads " + heads.join(", ") : "no head selected") +
        " · queries " + (nQ ? q0 : 0) + "–" + Math.max(q1 - 1, 0) + " of " + nQ +
        " · keys " + (nK ? k0 : 0) + "–" + Math.max(k1 - 1, 0) + " of " + nK + " · " + drawn.length + " lines drawn";
      var left = [];
      if (capped) left.push(capped + " lighter lines beyond the cap of " + cap);
      if (outside) left.push(outside + " outside the token window");
      if (light) left.push(light + " below the minimum weight");
      var om = p.omitted || {};
      if (om.total) left.push(om.total.toLocaleString("en-US") + " weights not sent to this page (" + om.rule + ")");
      status.textContent = msg + (left.length ? "; left out: " + left.join("; ") + "." : ".");
      drawEvidence(p, heads, scores);
      markGrid();
      box.setAttribute("data-draw-ms", (performance.now() - t).toFixed(1));
    }

    // -- evidence ----------------------------------------------------------------------------
    function drawEvidence(p, heads, scores) {
      clear(evBox);
      evBox.appendChild(el("h4", {}, "How far to trust these lines (layer " + st.layer + ")"));
      evBox.appendChild(el("p", {"class": "aav-note"}, ev.caveat ||
        "The lines are attention weights, not their effect on the output. The figures below are what the audit measured."));
      var rows = (ev.per_head || []).filter(function (r) {
        var lok = r.layer === null || r.layer === undefined || r.layer === "all" || String(r.layer) === String(st.layer);
        var hok = r.head === null || r.head === undefined || r.head === "all" || heads.indexOf(+r.head) >= 0;
        return (r.panel === undefined || r.panel === p.kind) && lok && hok;
      });
      var tb = el("table", {"class": "aav-ev"});
      var any = false;
      rows.forEach(function (r) {
        var tr = el("tr", {"class": "aav-evrow"});
        tr.appendChild(el("td", {}, (r.head === null || r.head === undefined || r.head === "all") ? "all heads" : "head " + r.head));
        tr.appendChild(el("td", {}, r.label));
        tr.appendChild(el("td", {}, fmt(r.value)));
        tr.appendChild(el("td", {"class": "aav-note"}, r.note || ""));
        tb.appendChild(tr); any = true;
      });
      if (any) evBox.appendChild(tb);
      else evBox.appendChild(el("p", {"class": "aav-na"}, "Head-level tests (e.g. head ablation) for layer " + st.layer +
        (heads.length === 1 ? ", head " + heads[0] : "") + ": not available in this audit."));
      var glob = ev.global || [];
      if (glob.length) {
        var ul = el("ul", {"class": "aav-global"});
        glob.forEach(function (r) { ul.appendChild(el("li", {}, r.label + ": " + fmt(r.value) + (r.note ? " (" + r.note + ")" : ""))); });
        evBox.appendChild(ul);
      } else evBox.appendChild(el("p", {"class": "aav-na"}, "Rank of raw attention among the explainers: not available."));
      if (scores.length) evBox.appendChild(el("p", {"class": "aav-note"}, "Coloured columns left of the queries: " +
        scores.map(function (s) { return s.name; }).join(", ") + " score of each token (red +, blue −, scaled to each method's largest)."));
      else evBox.appendChild(el("p", {"class": "aav-na"}, p.kind === "cross" ? "Token attributions: not shown for cross-attention." :
        "Token attributions (rollout, flow, grad-attention) for this example: not available."));
      (ev.missing || []).forEach(function (m) { evBox.appendChild(el("p", {"class": "aav-na"}, m + ": not available.")); });
    }

    // -- model view --------------------------------------------------------------------------
    var cells = [];
    function drawGrid() {
      var p = panel(), d = decode(p), g = p.grid, n = g.rows * g.cols;
      clear(gridBox); cells = [];
      gridBox.appendChild(el("h4", {}, "Model view: layers × heads (click a map to open it above)"));
      var tb = el("table", {"class": "aav-gridt"});
      var hr = el("tr"); hr.appendChild(el("th", {}, ""));
      for (var h = 0; h < p.n_heads; h++) hr.appendChild(el("th", {}, "h" + h));
      tb.appendChild(hr);
      for (var l = 0; l < p.n_layers; l++) {
        var tr = el("tr"); tr.appendChild(el("th", {}, "L" + l));
        for (var hh = 0; hh < p.n_heads; hh++) {
          var cv = el("canvas", {width: String(g.cols), height: String(g.rows), "class": "aav-cell",
                                 "data-layer": String(l), "data-head": String(hh), title: "layer " + l + ", head " + hh});
          var ctx = cv.getContext("2d"), img = ctx.createImageData(g.cols, g.rows), off = (l * p.n_heads + hh) * n;
          for (var i = 0; i < n; i++) {
            var v = d.grid[off + i];
            img.data[4 * i] = 255 - v * 0.88; img.data[4 * i + 1] = 255 - v * 0.66; img.data[4 * i + 2] = 255 - v * 0.3;
            img.data[4 * i + 3] = 255;
          }
          ctx.putImageData(img, 0, 0);
          cv.addEventListener("click", (function (ll, h2) { return function () {
            st.layer = ll; st.heads = {}; st.heads[h2] = true; draw(); }; })(l, hh));
          var td = el("td"); td.appendChild(cv); tr.appendChild(td); cells.push(cv);
        }
        tb.appendChild(tr);
      }
      gridBox.appendChild(tb);
      gridBox.appendChild(el("p", {"class": "aav-note"}, "Each map: queries down, keys across" +
        (g.block > 1 ? ", " + g.block + " × " + g.block + " positions per pixel (mean)" : "") + ", scaled to its own largest weight."));
    }
    function markGrid() {
      cells.forEach(function (c) {
        var on = +c.getAttribute("data-layer") === st.layer && st.heads[+c.getAttribute("data-head")];
        c.setAttribute("class", on ? "aav-cell aav-sel" : "aav-cell");
      });
    }

    drawGrid();
    draw();
    box.setAttribute("data-aav-state", "ready");
    box.setAttribute("data-render-ms", (performance.now() - T0).toFixed(1));
  }

  function initAll(scope) {
    var boxes = (scope || document).querySelectorAll("div.aav");
    for (var i = 0; i < boxes.length; i++) {
      try { init(boxes[i]); } catch (err) {
        boxes[i].setAttribute("data-aav-state", "failed");
        var p = document.createElement("p");
        p.textContent = "The attention view could not be drawn: " + err;
        boxes[i].appendChild(p);
      }
    }
  }
  var me = document.currentScript;
  if (me && me.parentNode) initAll(me.parentNode);
  initAll(document);
})();
