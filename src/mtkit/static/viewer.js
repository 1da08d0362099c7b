/*
 * mtkit's attention viewer: heatmaps of every attention weight of a translation (encoder-decoder,
 * encoder self-attention and decoder self-attention, every layer and head), drawn from the records
 * of mtkit.attention.attention_record. Plain JavaScript, no dependencies, works offline.
 *
 * It is used two ways:
 *
 * 1. Served by `mtkit serve`: GET / is index.html, which loads this file from /static/. The page
 *    sends the textarea's lines to POST /v1/translate with "attention": true, lists the
 *    translations and shows the attention of the line chosen. `?text=...` in the URL (URL-encoded,
 *    newlines allowed) fills the textarea and translates on load.
 *
 * 2. Without a server: a page that inlines viewer.css, this file and a JSON script element,
 *        <script type="application/json" id="mtkit-attention">, holding
 *        [{"line": 1, "text": "translation", "records": [RECORD, ...]}, ...]
 *    is rendered on load without any fetch: the translations and the viewer of the one chosen go
 *    into the element with id "mtkit-root", or into a <main> added to <body> when there is none.
 *    "line" is the number shown for the line (1 for the first), "records" one RECORD per piece the
 *    line was translated in ([] for an empty line), "source" (optional) the source line. Inside
 *    the JSON "</" must be written "<\/" (or every "<" as "\u003c"), so that no closing tag in the
 *    text ends the element early; this file holds no closing script tag and can be inlined as it is.
 *
 * From other code: window.mtkitViewer.render(container, records, options) draws the viewer of one
 * line into `container` and returns {state(), set(options)}; mtkitViewer.renderLines(container,
 * lines, options) draws a list of translations (as in 2.) with the viewer of the one chosen.
 * Options (all optional): kind "cross" | "encoder" | "decoder" (default "cross"); layer, from 0,
 * negative counting from the last (default -1); view "grid" (every head of the layer) | "head"
 * (one head, large) | "mean" (the average of the heads), default "grid"; head, from 0 (for
 * "head"); piece, from 0; title, source, target: the heading and the sentence pair shown above;
 * onChange(state): called with {piece, kind, layer, view, head} after each drawing.
 */
(function () {
  "use strict";

  const KINDS = {
    cross: {label: "encoder-decoder (cross)", rows: "target_tokens", cols: "source_tokens",
            rowName: "output", colName: "source"},
    encoder: {label: "encoder self-attention", rows: "source_tokens", cols: "source_tokens",
              rowName: "source", colName: "source"},
    decoder: {label: "decoder self-attention", rows: "target_tokens", cols: "target_inputs",
              rowName: "output", colName: "decoder input"},
  };
  const VIEWS = {grid: "every head", head: "one head", mean: "average of the heads"};
  const FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif';
  const ACCENT = "#d9480f";
  const INK = "#1d2329";
  const MUTED = "#5f6b76";
  const GAP = 26; // the CSS gap between maps (.maps), so that a row of maps fits the width it is given
  // ColorBrewer's "Blues": small weights stay light, so labels and highlights read well on white
  const STOPS = [[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
                 [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107]];
  const PALETTE = Array.from({length: 256}, (_, k) => {
    const t = (k / 255) * (STOPS.length - 1);
    const i = Math.min(Math.floor(t), STOPS.length - 2);
    const f = t - i;
    const c = STOPS[i].map((a, n) => Math.round(a + (STOPS[i + 1][n] - a) * f));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  });
  const GRADIENT = `linear-gradient(to right, ${STOPS.map((c) => `rgb(${c.join(",")})`).join(", ")})`;

  const clamp = (x, lo, hi) => Math.max(lo, Math.min(hi, x));
  const measurer = document.createElement("canvas").getContext("2d");

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) node.append(child);
    return node;
  }

  /** Text of SentencePiece pieces: "▁" marks a word start; <s> and </s> are left out. */
  function detokenize(pieces) {
    return pieces.filter((p) => p !== "</s>" && p !== "<s>").join("").replace(/\u2581/g, " ").trim();
  }

  /** A weight for a legend: two decimals, or two significant digits below 0.1. */
  function short(v) {
    return v >= 0.1 || v === 0 ? v.toFixed(2) : v.toPrecision(2);
  }

  /** `text`, cut with an ellipsis to at most `width` pixels in the context's current font. */
  function fit(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    let lo = 0;
    let hi = text.length;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (ctx.measureText(text.slice(0, mid) + "…").width <= width) lo = mid;
      else hi = mid - 1;
    }
    return text.slice(0, lo) + "…";
  }

  function widest(labels, font) {
    measurer.font = font;
    return labels.reduce((w, s) => Math.max(w, measurer.measureText(s).width), 0);
  }

  /**
   * One heatmap on a canvas: rows attend to columns, colours from 0 to the map's own largest
   * weight, the row subwords on the left and the column subwords on top. `onPoint(map, hit)` hears
   * where the pointer is: {row, col} (a cell), {row, col: null} (a row subword), {row: null, col}
   * (a column subword) or null.
   */
  class Heatmap {
    constructor(spec) {
      Object.assign(this, spec); // matrix, rows, cols, kind, layer, head, caption, cell, font, maxLabel
      this.max = this.matrix.reduce((m, row) => row.reduce((a, v) => Math.max(a, v), m), 0);
      const canvas = el("canvas", {className: "attention-map"});
      canvas.dataset.kind = this.kind;
      canvas.dataset.layer = String(this.layer);
      canvas.dataset.head = String(this.head);
      canvas.setAttribute("role", "img");
      const k = KINDS[this.kind];
      canvas.setAttribute("aria-label", `${this.caption}, ${k.label}: ${this.rows.length} ${k.rowName} x ` +
                          `${this.cols.length} ${k.colName} subwords, largest weight ${short(this.max)}`);
      this.canvas = canvas;
      this.ctx = canvas.getContext("2d");
      this.ctx.font = this.fontSpec(false);
      this.rowText = this.rows.map((s) => fit(this.ctx, s, this.maxLabel));
      this.colText = this.cols.map((s) => fit(this.ctx, s, this.maxLabel));
      // bold labels (the highlighted ones) are a little wider: leave them room
      const pad = 4;
      this.left = Math.ceil(widest(this.rowText, this.fontSpec(true))) + 2 * pad;
      this.top = Math.ceil(widest(this.colText, this.fontSpec(true))) + 2 * pad;
      this.width = this.left + this.cols.length * this.cell + pad;
      this.height = this.top + this.rows.length * this.cell + pad;
      this.dpr = window.devicePixelRatio || 1;
      canvas.width = Math.round(this.width * this.dpr);
      canvas.height = Math.round(this.height * this.dpr);
      canvas.style.width = `${this.width}px`;
      canvas.style.height = `${this.height}px`;
      canvas.addEventListener("mousemove", (e) => this.onPoint(this, this.hit(e)));
      canvas.addEventListener("mouseleave", () => this.onPoint(this, null));
    }

    fontSpec(bold) {
      return `${bold ? "bold " : ""}${this.font}px ${FONT}`;
    }

    hit(event) {
      const box = this.canvas.getBoundingClientRect();
      const x = event.clientX - box.left;
      const y = event.clientY - box.top;
      const col = Math.floor((x - this.left) / this.cell);
      const row = Math.floor((y - this.top) / this.cell);
      const inRows = row >= 0 && row < this.rows.length;
      const inCols = col >= 0 && col < this.cols.length;
      if (inRows && inCols) return {row, col};
      if (inRows && x < this.left) return {row, col: null};
      if (inCols && y < this.top) return {row: null, col};
      return null;
    }

    /** Draw the map; `focus` ({row, col}, either may be null) lights its row and column, `pointed`
     * says whether the pointer is on this map (its cell gets an outline). */
    draw(focus, pointed) {
      const {ctx, cell, left, top} = this;
      const scale = this.max > 0 ? 255 / this.max : 0;
      const lit = (i, j) => !focus || focus.row === i || focus.col === j;
      ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
      ctx.clearRect(0, 0, this.width, this.height);
      this.matrix.forEach((values, i) => values.forEach((v, j) => {
        ctx.fillStyle = PALETTE[clamp(Math.round(v * scale), 0, 255)];
        ctx.fillRect(left + j * cell, top + i * cell, cell, cell);
        if (!lit(i, j)) {
          ctx.fillStyle = "rgba(255,255,255,0.72)";
          ctx.fillRect(left + j * cell, top + i * cell, cell, cell);
        }
      }));
      ctx.strokeStyle = "#c3ccd5";
      ctx.lineWidth = 1;
      ctx.strokeRect(left - 0.5, top - 0.5, this.cols.length * cell + 1, this.rows.length * cell + 1);
      ctx.strokeStyle = ACCENT;
      ctx.lineWidth = 1.5;
      const across = this.cols.length * cell;
      const down = this.rows.length * cell;
      if (focus && focus.row !== null) ctx.strokeRect(left, top + focus.row * cell, across, cell);
      if (focus && focus.col !== null) ctx.strokeRect(left + focus.col * cell, top, cell, down);
      if (pointed && focus && focus.row !== null && focus.col !== null) {
        ctx.lineWidth = 2.5;
        ctx.strokeRect(left + focus.col * cell, top + focus.row * cell, cell, cell);
      }
      ctx.textBaseline = "middle";
      ctx.textAlign = "right";
      this.rowText.forEach((text, i) => {
        const on = focus && focus.row === i;
        ctx.font = this.fontSpec(on);
        ctx.fillStyle = on ? ACCENT : focus ? MUTED : INK;
        ctx.fillText(text, left - 4, top + i * cell + cell / 2);
      });
      ctx.textAlign = "left";
      this.colText.forEach((text, j) => {
        const on = focus && focus.col === j;
        ctx.font = this.fontSpec(on);
        ctx.fillStyle = on ? ACCENT : focus ? MUTED : INK;
        ctx.save();
        ctx.translate(left + j * cell + cell / 2, top - 4);
        ctx.rotate(-Math.PI / 2);
        ctx.fillText(text, 0, 0);
        ctx.restore();
      });
    }

    /** The figure: caption, canvas and the legend of its colour scale. */
    figure() {
      const bar = el("span", {className: "bar"});
      bar.style.background = GRADIENT;
      const legend = el("div", {className: "legend", title: "colours from 0 to this map's largest weight"},
                        [el("span", {textContent: "0"}), bar, el("span", {textContent: short(this.max)})]);
      return el("figure", {}, [el("figcaption", {textContent: this.caption}), this.canvas, legend]);
    }

    /** The weight under the pointer, or the strongest link of a row or column subword, in words. */
    describe(hit) {
      const k = KINDS[this.kind];
      const {rows, cols, matrix} = this;
      if (hit.row !== null && hit.col !== null) {
        const weight = matrix[hit.row][hit.col].toFixed(4);
        return `${this.caption}: ${rows[hit.row]} \u2192 ${cols[hit.col]}  ${weight}` +
               `   (this map's scale: 0 to ${this.max.toFixed(4)})`;
      }
      if (hit.row !== null) {
        const values = matrix[hit.row];
        const j = values.indexOf(Math.max(...values));
        return `${this.caption}: ${k.rowName} ${rows[hit.row]} attends most to ${k.colName} ${cols[j]}` +
               `  ${values[j].toFixed(4)}`;
      }
      const values = matrix.map((r) => r[hit.col]);
      const i = values.indexOf(Math.max(...values));
      return `${this.caption}: ${k.colName} ${cols[hit.col]} is attended most by ${k.rowName} ${rows[i]}` +
             `  ${values[i].toFixed(4)}`;
    }
  }

  /** Cell size, font size and label width of the maps of a view, fitted to `width` pixels. */
  function sizes(view, maps, rows, cols, width) {
    const nRows = rows.length;
    const nCols = cols.length;
    if (view === "grid") {
      const fontFor = (cell) => clamp(cell - 5, 8, 12);
      const cellFor = (perRow, font) => {
        const label = Math.min(90, widest(rows, `bold ${font}px ${FONT}`)) + 12;
        return Math.floor(((width - GAP * (perRow - 1)) / perRow - label - 6) / nCols);
      };
      // as many maps side by side as keep cells readable; the labels' width depends on the font,
      // which depends on the cell: a second pass with the font of the first
      for (let perRow = maps; perRow >= 1; perRow--) {
        const font = fontFor(clamp(cellFor(perRow, 12), 9, 22));
        const cell = cellFor(perRow, font);
        if (cell >= 12 || perRow === 1) return {cell: clamp(cell, 9, 22), font, maxLabel: 90};
      }
    }
    const label = Math.min(160, widest(rows, `bold 13px ${FONT}`)) + 12;
    const cell = clamp(Math.min(Math.floor((width - label - 6) / nCols), Math.floor(680 / nRows)), 14, 36);
    return {cell, font: clamp(cell - 5, 10, 14), maxLabel: 160};
  }

  function select(label, choices, value, onChange) {
    const options = choices.map(([v, text]) => el("option", {value: String(v), textContent: text}));
    const box = el("select", {}, options);
    box.value = String(value);
    box.addEventListener("change", () => onChange(box.value));
    return {label: el("label", {}, [label, box]), box};
  }

  const resizers = new WeakMap();

  /** The attention viewer of one line: `records`, one per piece the line was translated in. */
  function render(container, records, options) {
    const opts = Object.assign({}, options);
    const state = {piece: 0, kind: "cross", layer: -1, view: "grid", head: 0};
    for (const key of Object.keys(state)) {
      if (opts[key] !== undefined && opts[key] !== null) state[key] = opts[key];
    }
    if (resizers.has(container)) resizers.get(container).disconnect();
    container.classList.add("mtkit-viewer");
    container.replaceChildren(el("h2", {textContent: opts.title || "Attention"}));
    const controller = {state: () => Object.assign({}, state), set: () => {}, element: container};
    if (!Array.isArray(records) || records.length === 0) {
      const why = records ? "The line is empty: nothing to show." : "No attention was sent for this line.";
      container.append(el("p", {className: "empty", textContent: why}));
      return controller;
    }
    const pair = el("div", {className: "pair"});
    const pieceBox = el("label");
    const kindBox = select("attention", Object.entries(KINDS).map(([k, v]) => [k, v.label]), state.kind,
                           (v) => update({kind: v}));
    const layerBox = select("layer", [], 0, (v) => update({layer: Number(v)}));
    const viewBox = select("show", Object.entries(VIEWS), state.view, (v) => update({view: v}));
    const headBox = select("head", [], 0, (v) => update({head: Number(v)}));
    const note = el("p", {className: "note"});
    const readout = el("div", {className: "readout"});
    readout.setAttribute("aria-live", "polite");
    const mapsBox = el("div", {className: "maps"});
    container.append(pair, el("div", {className: "controls"},
                              [pieceBox, kindBox.label, layerBox.label, viewBox.label, headBox.label]),
                     note, readout, mapsBox);
    let maps = [];
    let focus = null;
    const hint = "Point at a cell, or at a subword on either axis, to see its weights.";

    function point(map, hit) {
      focus = hit;
      for (const m of maps) m.draw(focus, m === map);
      readout.textContent = hit ? map.describe(hit) : hint;
    }

    function normalise() {
      const record = records[state.piece] || records[0];
      state.piece = records.indexOf(record);
      if (!(state.kind in KINDS)) state.kind = "cross";
      if (!(state.view in VIEWS)) state.view = "grid";
      const layer = Math.trunc(Number(state.layer)) || 0;
      state.layer = clamp(layer < 0 ? record.layers + layer : layer, 0, record.layers - 1);
      state.head = clamp(Math.trunc(Number(state.head)) || 0, 0, record.heads - 1);
      return record;
    }

    function draw() {
      const record = normalise();
      const k = KINDS[state.kind];
      const rows = record[k.rows];
      const cols = record[k.cols];
      pair.replaceChildren(
        el("div", {}, [el("span", {className: "side", textContent: "source"}),
                       opts.source !== undefined ? opts.source : detokenize(record.source_tokens)]),
        el("div", {}, [el("span", {className: "side", textContent: "output"}),
                       opts.target !== undefined ? opts.target : detokenize(record.target_tokens)]));
      pieceBox.hidden = records.length < 2;
      if (records.length > 1) {
        const box = select("piece", records.map((r, i) => [i, `${i + 1} of ${records.length}: ` +
                                                          detokenize(r.source_tokens).slice(0, 40)]),
                           state.piece, (v) => update({piece: Number(v)}));
        pieceBox.replaceChildren(...box.label.childNodes);
      }
      kindBox.box.value = state.kind;
      viewBox.box.value = state.view;
      layerBox.box.replaceChildren(...Array.from({length: record.layers}, (_, i) =>
        el("option", {value: String(i), textContent: `${i + 1} of ${record.layers}`})));
      layerBox.box.value = String(state.layer);
      headBox.box.replaceChildren(...Array.from({length: record.heads}, (_, i) =>
        el("option", {value: String(i), textContent: `${i + 1} of ${record.heads}`})));
      headBox.box.value = String(state.head);
      headBox.label.hidden = state.view !== "head";
      note.textContent = `Rows: ${k.rowName} subwords; columns: ${k.colName} subwords; each row's weights ` +
                         "sum to 1. Each map has its own colour scale, from 0 to its largest weight.";
      const heads = record[state.kind][state.layer];
      let chosen;
      if (state.view === "grid") {
        chosen = heads.map((m, h) => ({matrix: m, head: h, caption: `head ${h + 1}`}));
      } else if (state.view === "head") {
        chosen = [{matrix: heads[state.head], head: state.head,
                   caption: `layer ${state.layer + 1}, head ${state.head + 1}`}];
      } else {
        const n = heads.length;
        const mean = rows.map((_, i) => cols.map((_, j) => heads.reduce((s, m) => s + m[i][j], 0) / n));
        chosen = [{matrix: mean, head: "mean", caption: `layer ${state.layer + 1}, average of ${n} heads`}];
      }
      const width = mapsBox.clientWidth || container.clientWidth || 1000;
      const size = sizes(state.view, chosen.length, rows, cols, width);
      focus = null;
      maps = chosen.map((c) => new Heatmap(Object.assign(c, size, {rows, cols, kind: state.kind,
                                                                   layer: state.layer, onPoint: point})));
      mapsBox.className = `maps ${state.view}`;
      mapsBox.replaceChildren(...maps.map((m) => m.figure()));
      for (const m of maps) m.draw(null, false);
      readout.textContent = hint;
      if (opts.onChange) opts.onChange(Object.assign({}, state));
    }

    function update(change) {
      Object.assign(state, change);
      draw();
    }

    controller.set = update;
    draw();
    // redraw when the width changes, so that the grid of maps keeps fitting
    let lastWidth = mapsBox.clientWidth;
    let timer = null;
    if (window.ResizeObserver) {
      const watcher = new ResizeObserver(() => {
        clearTimeout(timer);
        timer = setTimeout(() => {
          if (mapsBox.isConnected && mapsBox.clientWidth !== lastWidth) {
            lastWidth = mapsBox.clientWidth;
            draw();
          }
        }, 150);
      });
      watcher.observe(container);
      resizers.set(container, watcher);
    }
    return controller;
  }

  /**
   * Translations in `list` (one <li class="translation"> each) and the viewer in `viewerBox` of the
   * one chosen (the first non-empty at first); a click or Enter on an item chooses it.
   */
  function showLines(list, viewerBox, lines, options) {
    let viewer = null;
    const items = lines.map((line, i) => {
      const item = el("li", {className: "translation", textContent: line.text, tabIndex: 0});
      item.dataset.line = String(line.line !== undefined ? line.line : i + 1);
      if (line.source !== undefined) item.title = line.source;
      item.addEventListener("click", () => choose(i));
      item.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          choose(i);
        }
      });
      return item;
    });
    list.replaceChildren(...items);

    function choose(i) {
      items.forEach((item, n) => {
        item.classList.toggle("selected", n === i);
        if (n === i) item.setAttribute("aria-current", "true");
        else item.removeAttribute("aria-current");
      });
      const line = lines[i];
      // keep the reader's kind, layer and view from one line to the next
      const kept = viewer ? viewer.state() : {};
      delete kept.piece;
      viewer = render(viewerBox, line.records, Object.assign({}, options, kept, {
        title: `Attention of line ${items[i].dataset.line}`, source: line.source, target: line.text}));
    }

    if (lines.length) {
      const first = lines.findIndex((line) => line.text !== "" || (line.records && line.records.length));
      choose(first < 0 ? 0 : first);
    } else {
      viewerBox.replaceChildren();
    }
    return {choose, viewer: () => viewer};
  }

  /** The translations of `lines` ([{line, text, records, source?}]) and the viewer of the one chosen. */
  function renderLines(container, lines, options) {
    const list = el("ol", {className: "translations"});
    if (!document.getElementById("translations")) list.id = "translations";
    const viewerBox = el("section", {className: "mtkit-viewer"});
    const heading = el("h2", {className: "mtkit-heading", textContent: "Translation"});
    container.replaceChildren(heading, list, viewerBox);
    return showLines(list, viewerBox, lines, options);
  }

  /** The page of `mtkit serve`: translate the textarea's lines and show their attention. */
  function app() {
    const byId = (id) => document.getElementById(id);
    const source = byId("source");
    const button = byId("translate");
    const list = byId("translations");
    const status = byId("status");
    const beam = byId("beam");
    const modelName = byId("model");
    const viewerBox = byId("mtkit-viewer");
    let sequence = 0;

    function say(text, kind) {
      status.textContent = text;
      status.className = `status${kind ? ` ${kind}` : ""}`;
    }

    /** The message of an error answer: the API's "error", else FastAPI's "detail", else the status. */
    function problem(response, data) {
      if (data && typeof data.error === "string") return data.error;
      if (data && typeof data.detail === "string") return data.detail;
      if (data && Array.isArray(data.detail) && data.detail.length) {
        const d = data.detail[0];
        return `${(d.loc || []).join(".")}: ${d.msg || JSON.stringify(d)}`;
      }
      return `HTTP ${response.status} ${response.statusText}`.trim();
    }

    async function describeModel(tries) {
      try {
        const response = await fetch("/v1/models");
        const data = await response.json().catch(() => null);
        // 503 while the server still loads the model: ask again in a second
        if (response.status === 503 && tries > 1) {
          modelName.textContent = "model: loading\u2026";
          setTimeout(() => describeModel(tries - 1), 1000);
          return;
        }
        if (!response.ok || !data || !Array.isArray(data.models) || !data.models.length) {
          throw new Error(data ? problem(response, data) : `HTTP ${response.status}`);
        }
        const m = data.models[0];
        modelName.textContent = `model: ${m.name} (${m.src_lang} \u2192 ${m.tgt_lang}, ${m.layers} layers ` +
                                `\u00d7 ${m.heads} heads, beam ${m.beam})`;
        if (!beam.value && m.beam) beam.value = String(m.beam);
      } catch (err) {
        modelName.textContent = "model: unknown";
        if (!status.textContent) say(`Cannot read the model's description (/v1/models): ${err.message}`,
                                     "error");
      }
    }
    describeModel(120);

    async function submit() {
      let text = source.value.replace(/\r\n?/g, "\n");
      if (text.endsWith("\n")) text = text.slice(0, -1);
      if (!text.trim()) {
        say("Type a sentence to translate, one per line.", "error");
        return;
      }
      const lines = text.split("\n");
      const body = {text: lines, attention: true};
      const wanted = beam.value.trim();
      // a beam that is not a whole number goes as typed, so that the server's error names it
      if (wanted !== "") body.beam = /^-?\d+$/.test(wanted) ? Number(wanted) : wanted;
      const mine = ++sequence;
      button.disabled = true;
      document.body.dataset.state = "busy";
      say(`Translating ${lines.length} line${lines.length === 1 ? "" : "s"}\u2026`, "busy");
      let outcome;
      try {
        const response = await fetch("/v1/translate", {method: "POST", body: JSON.stringify(body),
                                                       headers: {"Content-Type": "application/json"}});
        const data = await response.json().catch(() => null);
        if (!response.ok || !data || data.error) outcome = {error: problem(response, data)};
        else if (!Array.isArray(data.translations) || data.translations.length !== lines.length) {
          outcome = {error: `the server sent ${data.translations ? data.translations.length : "no"} ` +
                            `translations for ${lines.length} lines`};
        } else outcome = {data};
      } catch (err) {
        outcome = {error: `cannot reach the server (${err.message})`};
      }
      if (mine !== sequence) return; // a newer request has been sent meanwhile: its answer counts
      button.disabled = false;
      if (outcome.error) {
        say(`Error: ${outcome.error}`, "error");
        document.body.dataset.state = "error";
        return;
      }
      const data = outcome.data;
      const attention = Array.isArray(data.attention) ? data.attention : [];
      showLines(list, viewerBox, data.translations.map((t, i) => ({
        line: i + 1, text: t, source: lines[i], records: attention[i] || null})), {});
      const ms = typeof data.time_ms === "number" ? ` in ${data.time_ms.toFixed(1)} ms` : "";
      say(`${lines.length} line${lines.length === 1 ? "" : "s"} translated${ms} by ${data.model}.`);
      document.body.dataset.state = "done";
    }

    button.addEventListener("click", submit);
    source.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        submit();
      }
    });
    const given = new URLSearchParams(window.location.search).get("text");
    if (given !== null) {
      source.value = given;
      submit();
    }
  }

  /** On load: the inlined records if the page has them, else the served page's form if it has one. */
  function start() {
    const block = document.getElementById("mtkit-attention");
    if (block) {
      let root = document.getElementById("mtkit-root");
      if (!root) {
        root = el("main", {id: "mtkit-root"});
        document.body.append(root);
      }
      let lines;
      try {
        lines = JSON.parse(block.textContent);
        if (!Array.isArray(lines)) throw new Error("not an array of lines");
      } catch (err) {
        const message = `Error: the attention data cannot be read (${err.message})`;
        root.replaceChildren(el("p", {className: "status error", textContent: message}));
        return;
      }
      renderLines(root, lines, {});
      document.body.dataset.state = "done";
    } else if (document.getElementById("source") && document.getElementById("translations")) {
      app();
    }
  }

  window.mtkitViewer = {render, renderLines, kinds: Object.keys(KINDS), views: Object.keys(VIEWS)};
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
