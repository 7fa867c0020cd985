// harness view: lays out window.HARNESS_VIEW (written by harness/view/data.py), which names every
// statistic and column; this script builds no statistic name of its own. Plots are Plotly's.
"use strict";

(function () {
  const data = window.HARNESS_VIEW;
  const app = document.getElementById("app");
  const PLOT_CONFIG = { displaylogo: false, responsive: true };

  // --- small helpers ---------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
    const size = Math.abs(value);
    if (size !== 0 && (size < 1e-3 || size >= 1e5)) return value.toExponential(2);
    return String(Number(value.toPrecision(4)));
  }

  function section(id, title, ...children) {
    return el("section", { id }, el("h2", { text: title }), ...children);
  }

  function table(headers, rows, attrs) {
    return el("table", attrs || {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
      el("tbody", {}, rows.map((row) => el("tr", {}, row.map((cell) => el("td", {}, cell))))));
  }

  function select(id, options, value, onchange) {
    const node = el("select", { id, onchange: (event) => onchange(event.target.value) },
      options.map((option) => el("option", { value: option.value, text: option.label })));
    node.value = String(value);
    return node;
  }

  function badge(outcome) {
    return el("span", { class: "badge " + outcome.toLowerCase(), text: outcome });
  }

  // A per-layer curve with its confidence band (when it has bounds) as Plotly traces.
  function curveTraces(name, layers, values, low, high, color) {
    const traces = [];
    if (low && high && low.some((v) => v !== null)) {
      traces.push({ x: layers, y: high, mode: "lines", line: { width: 0 }, hoverinfo: "skip", showlegend: false, name: name + " CI high" });
      traces.push({ x: layers, y: low, mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: color + "33",
        hoverinfo: "skip", showlegend: false, name: name + " CI low" });
    }
    traces.push({ x: layers, y: values, mode: "lines+markers", name, line: { color },
      customdata: layers.map((_, i) => [low ? low[i] : null, high ? high[i] : null]),
      hovertemplate: low ? "layer %{x}: %{y:.4g} [%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra>" + name + "</extra>"
                         : "layer %{x}: %{y:.4g}<extra>" + name + "</extra>" });
    return traces;
  }

  // whole layers only: a model of a few layers would otherwise get ticks at 0.5
  const layerAxis = () => Object.assign({ title: { text: "layer" } }, data.layers && data.layers.length <= 12 ? { dtick: 1 } : {});
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

  function plot(node, traces, layout) {
    if (layout.title) layout.title = Object.assign({ x: 0.01, xanchor: "left" }, layout.title);
    Plotly.newPlot(node, traces, Object.assign({ margin: { t: 50, r: 10, b: 45, l: 55 }, height: 340,
      hovermode: "closest", legend: { orientation: "h", x: 1, xanchor: "right", y: 1.02, yanchor: "bottom" } }, layout), PLOT_CONFIG);
    return node;
  }

  // --- header and criteria -------------------------------------------------------------------

  function header() {
    const up = data.up ? el("p", { class: "up" }, el("a", { href: data.up.link, text: "← " + data.up.label })) : null;
    const failed = data.criteria.filter((c) => c.outcome !== "PASSED").length;
    return el("header", {}, up,
      el("h1", {}, data.title, el("span", { class: "run-id", text: data.run_id })),
      data.point ? el("p", { class: "point", text: "matrix point " + data.point }) : null,
      el("p", { id: "summary", class: "summary " + (failed ? "failed" : data.criteria.length ? "passed" : ""), text: data.summary }),
      data.hypothesis ? el("p", { class: "hypothesis" }, el("strong", { text: "Hypothesis: " }), data.hypothesis) : null,
      data.headline ? el("p", { class: "headline" }, el("strong", { text: "Effect: " }), data.headline.metric + " (" + data.primary.a + " − " +
        data.primary.b + ", mean over layers): Cohen's d " + headlineText(data.headline) + " · " + data.samples.length + " samples") : null);
  }

  function criteriaSection(title) {
    const detail = el("div", { id: "criterion-detail", class: "detail", hidden: true });
    const items = data.criteria.map((criterion, index) => el("li", {
      class: "criterion " + criterion.outcome.toLowerCase(), "data-criterion": criterion.name, "data-outcome": criterion.outcome,
      tabindex: 0, onclick: () => showCriterion(index, detail), onkeydown: (e) => { if (e.key === "Enter") showCriterion(index, detail); },
    }, badge(criterion.outcome), el("span", { class: "name", text: criterion.name }), el("code", { text: criterion.expr }),
      el("span", { class: "values", text: criterion.statistics.map((s) => s.name + " = " + fmt(s.value)).join(", ") }),
      criterion.error ? el("span", { class: "error", text: criterion.error }) : null));
    return section("criteria", title, el("p", { class: "hint", text: "Click a criterion for the statistics it read." }),
      el("ul", { class: "criteria" }, items), detail);
  }

  function showCriterion(index, detail) {
    const criterion = data.criteria[index];
    document.querySelectorAll("li.criterion").forEach((node, i) => node.classList.toggle("selected", i === index));
    detail.hidden = false;
    detail.replaceChildren(el("h3", {}, badge(criterion.outcome), " ", criterion.name), el("code", { text: criterion.expr }),
      table(["statistic", "value", "confidence interval", "beside it"], criterion.statistics.map((stat) => [
        el("code", { text: stat.name }), fmt(stat.value),
        stat.ci ? "[" + fmt(stat.ci[0]) + ", " + fmt(stat.ci[1]) + "]" : "–",
        [stat.comparison ? stat.comparison + ": " : "",
          Object.entries(stat.related).filter(([k]) => !stat.name.endsWith("." + k)).map(([k, v]) => k + " " + fmt(v)).join(", ")],
      ]), { class: "statistics" }));
    criterion.statistics.filter((stat) => stat.curve).forEach((stat, i) => {
      const curve = stat.curve;
      const node = el("div", { class: "plot criterion-curve", "data-statistic": stat.name });
      detail.append(node);
      plot(node, curveTraces(curve.label, curve.layers, curve.values, curve.ci_low, curve.ci_high, COLORS[i % COLORS.length]),
        { title: { text: curve.label, font: { size: 13 } }, xaxis: layerAxis() });
    });
  }

  // --- effects, windows, directions ----------------------------------------------------------

  function effectsSection() {
    const comparisons = data.comparisons.map((c) => ({ value: c.name, label: c.name + " (" + c.a + " − " + c.b + ")" }));
    const columns = Object.keys(data.means).map((c) => ({ value: c, label: c }));
    const state = { comparison: data.primary.comparison, column: data.primary.metric };
    const effect = el("div", { class: "plot", id: "effect-plot" });
    const means = el("div", { class: "plot", id: "means-plot" });
    function draw() {
      const curve = (data.effects[state.comparison] || {})[state.column];
      if (curve) {
        const significant = curve.layers.filter((_, i) => curve.p_holm[i] !== null && curve.p_holm[i] < data.alpha);
        plot(effect, curveTraces("Cohen's d", curve.layers, curve.d, curve.d_ci_low, curve.d_ci_high, COLORS[0]).concat([{
          x: significant, y: significant.map((layer) => curve.d[curve.layers.indexOf(layer)]), mode: "markers",
          name: "p (Holm across layers) < " + data.alpha, marker: { color: COLORS[0], size: 11, symbol: "circle-open" },
          customdata: significant.map((layer) => curve.p_holm[curve.layers.indexOf(layer)]),
          hovertemplate: "layer %{x}: p_holm %{customdata:.3g}<extra></extra>" }]),
        { title: { text: state.column + ": paired effect by layer, " + state.comparison, font: { size: 13 } },
          xaxis: layerAxis(), yaxis: { title: { text: "Cohen's d (95% CI)" }, zeroline: true } });
      } else {
        effect.replaceChildren(el("p", { text: "No per-layer statistics for " + state.column + "." }));
      }
      plot(means, data.conditions.map((condition, i) => ({ x: data.layers, y: data.means[state.column][condition], mode: "lines+markers",
        name: condition, line: { color: COLORS[i % COLORS.length] }, hovertemplate: "layer %{x}: %{y:.4g}<extra>" + condition + "</extra>" })),
      { title: { text: state.column + ": mean over samples by layer", font: { size: 13 } }, xaxis: layerAxis() });
    }
    const node = section("effects", "Effects by layer",
      el("div", { class: "controls" },
        el("label", {}, "comparison ", select("effect-comparison", comparisons, state.comparison, (v) => { state.comparison = v; draw(); })),
        el("label", {}, "metric ", select("effect-column", columns, state.column, (v) => { state.column = v; draw(); }))),
      el("div", { class: "plots" }, effect, means));
    requestAnimationFrame(draw);
    return node;
  }

  function windowsSection() {
    const state = { column: data.windows[0].column };
    const byLayer = el("div", { class: "plot", id: "window-plot" });
    const overall = el("div", { class: "plot", id: "window-overall-plot" });
    function draw() {
      const entry = data.windows.find((w) => w.column === state.column);
      const curves = data.effects[data.primary.comparison] || {};
      plot(byLayer, entry.windows.filter((w) => curves[w.column]).map((w, i) => {
        const c = curves[w.column];
        return { x: c.layers, y: c.d, mode: "lines+markers", name: "tokens " + w.start + "–" + w.end, line: { color: COLORS[i % COLORS.length] },
          hovertemplate: "layer %{x}: d %{y:.3g}<extra>" + w.name + "</extra>" };
      }), { title: { text: state.column + ": d by layer per window", font: { size: 13 } }, xaxis: layerAxis() });
      plot(overall, [{ type: "bar", x: entry.windows.map((w) => w.start + "–" + w.end), y: entry.windows.map((w) => w.d),
        error_y: { type: "data", symmetric: false, array: entry.windows.map((w) => w.d_ci_high === null ? null : w.d_ci_high - w.d),
          arrayminus: entry.windows.map((w) => w.d_ci_low === null ? null : w.d - w.d_ci_low) },
        customdata: entry.windows.map((w) => w.p), hovertemplate: "tokens %{x}: d %{y:.3g}, p %{customdata:.3g}<extra></extra>" }],
      { title: { text: state.column + ": d over each window (mean over layers)", font: { size: 13 } }, xaxis: { title: { text: "response tokens" } } });
    }
    const node = section("windows", "Position windows",
      el("div", { class: "controls" }, el("label", {}, "metric ",
        select("window-column", data.windows.map((w) => ({ value: w.column, label: w.column })), state.column, (v) => { state.column = v; draw(); }))),
      el("div", { class: "plots" }, byLayer, overall));
    requestAnimationFrame(draw);
    return node;
  }

  function directionsSection() {
    return section("directions", "Directions", data.directions.map((d) => el("div", { class: "direction" },
      el("h3", { text: d.name }),
      el("p", {}, "file ", el("code", { text: d.path }), d.sha256 ? " · sha256 " + d.sha256.slice(0, 16) + "…" : "",
        d.shape ? " · shape " + d.shape.join(" × ") : "", d.held_out ? " · evaluated on held-out samples only" : "",
        d.built_from ? " · built from samples " + d.built_from : ""),
      Object.keys(d.metadata || {}).length ? table(["metadata", "value"], Object.entries(d.metadata).map(([k, v]) => [k, String(v)])) : null,
      table(["metric", "d", "95% CI", "p", "strongest layer", "d there"], d.rows.map((r) => [
        el("code", { text: r.metric }), fmt(r.d), "[" + fmt(r.d_ci_low) + ", " + fmt(r.d_ci_high) + "]", fmt(r.p),
        fmt(r.strongest_layer), fmt(r.strongest_d)])))));
  }

  function keyValues(value) {
    if (value === null || typeof value !== "object") return fmt(value);
    return table(["", ""], Object.entries(value).map(([k, v]) => [k, typeof v === "object" && v !== null ? el("code", { text: JSON.stringify(v) }) : fmt(v)]),
      { class: "kv" });
  }

  function interventionsSection() {
    return section("interventions", "What was changed (interventions)", keyValues(data.interventions));
  }

  // --- samples ------------------------------------------------------------------------------

  function samplesSection(onPick) {
    const conditions = data.conditions;
    const p = data.primary;
    const columns = [
      { key: "id", label: "sample", value: (s) => s.id },
      { key: "diff", label: p.metric + " " + p.a + " − " + p.b, value: (s) => s.diff },
      { key: "ce_diff", label: p.text_metric + " " + p.a + " − " + p.b, value: (s) => s.ce_diff },
      ...conditions.map((c) => ({ key: "ce:" + c, label: p.text_metric + " " + c, value: (s) => (s.conditions[c] || {}).ce })),
    ];
    const state = { sort: "diff", descending: true, text: "", dropped: false, short: false };
    const body = el("tbody", {});
    const count = el("span", { id: "sample-count" });
    function value(sample, key) { return columns.find((c) => c.key === key).value(sample); }
    function draw() {
      const needle = state.text.toLowerCase();
      const rows = data.samples.filter((s) => (!state.dropped || s.dropped) && (!state.short || s.short) &&
        (!needle || (s.prompt + " " + conditions.map((c) => (s.conditions[c] || {}).response || "").join(" ")).toLowerCase().includes(needle)));
      rows.sort((x, y) => {
        const a = value(x, state.sort), b = value(y, state.sort);
        if (a === null || a === undefined) return 1;
        if (b === null || b === undefined) return -1;
        return state.descending ? b - a : a - b;
      });
      count.textContent = rows.length + " of " + data.samples.length + " samples";
      body.replaceChildren(...rows.map((s) => el("tr", { class: "sample", "data-sample": s.id },
        el("td", {}, el("a", { href: "#tokens", onclick: () => onPick(s.id), text: "#" + s.id })),
        columns.slice(1).map((c) => el("td", { class: "num", text: fmt(c.value(s)) })),
        el("td", { class: "text prompt", text: s.prompt }),
        conditions.map((c) => {
          const entry = s.conditions[c] || {};
          return el("td", { class: "text response" }, entry.response || "",
            el("div", { class: "flags" }, entry.tokens !== null && entry.tokens !== undefined ? entry.tokens + " tokens" : "",
              entry.stopped_early ? el("span", { class: "flag short", text: "stopped early" }) : null,
              entry.dropped ? el("span", { class: "flag dropped", text: "dropped: " + entry.dropped.join(", ") + (entry.reason ? " (" + entry.reason + ")" : "") }) : null));
        }))));
    }
    const headers = el("tr", {}, columns.map((c) => el("th", { class: "sortable num", "data-sort": c.key, title: "sort",
      onclick: () => { state.descending = state.sort === c.key ? !state.descending : true; state.sort = c.key; draw(); markSorted(); } }, c.label)),
    el("th", { text: "prompt" }), conditions.map((c) => el("th", { text: c + " response" })));
    function markSorted() {
      headers.querySelectorAll("th.sortable").forEach((th) => {
        th.classList.toggle("sorted", th.dataset.sort === state.sort);
        th.dataset.direction = th.dataset.sort === state.sort ? (state.descending ? "descending" : "ascending") : "";
      });
    }
    const node = section("samples", "Samples",
      el("div", { class: "controls" },
        el("input", { id: "sample-filter", type: "search", placeholder: "filter by text", oninput: (e) => { state.text = e.target.value; draw(); } }),
        el("label", {}, el("input", { id: "only-dropped", type: "checkbox", onchange: (e) => { state.dropped = e.target.checked; draw(); } }), " dropped only"),
        el("label", {}, el("input", { id: "only-short", type: "checkbox", onchange: (e) => { state.short = e.target.checked; draw(); } }), " stopped early only"),
        count),
      el("p", { class: "hint", text: "Click a column heading to sort (again to reverse); click a sample for its token heatmap." }),
      el("div", { class: "scroll" }, el("table", { id: "sample-table", class: "samples" }, el("thead", {}, headers), body)));
    draw();
    markSorted();
    return node;
  }

  // --- token heatmap ------------------------------------------------------------------------

  function tokensSection() {
    const tokens = data.tokens;
    const ids = Object.keys(tokens.texts);
    const state = { sample: ids[0], layer: String(tokens.layer) };
    const maps = el("div", { id: "heatmap" });
    const scale = el("p", { class: "hint", id: "heat-scale" });
    const bars = el("div", { class: "plot", id: "token-plot" });
    function draw() {
      const texts = tokens.texts[state.sample] || {};
      const norms = Object.values(texts).flatMap((t) => (t.norms[state.layer] || []).filter((v) => v !== null));
      const low = Math.min(...norms), span = Math.max(Math.max(...norms) - low, 1e-12);  // both conditions on one scale
      scale.textContent = norms.length ? "white = " + fmt(low) + ", darkest = " + fmt(low + span) + " (both conditions, this sample and layer)" : "";
      maps.replaceChildren(...data.conditions.filter((c) => texts[c]).map((c) => {
        const text = texts[c], row = text.norms[state.layer] || [];
        return el("div", { class: "heat-row", "data-condition": c }, el("h4", { text: c }),
          el("p", { class: "heat" }, text.tokens.map((token, i) => {
            const norm = i === 0 ? null : row[i - 1];  // step i-1 -> i is the arrival of token i
            const style = norm === null || norm === undefined ? null : "background: rgba(214, 39, 40, " + (0.05 + 0.85 * (norm - low) / span).toFixed(3) + ")";
            return el("span", { class: "tok", style, title: norm === null || norm === undefined ? "first token" : "‖Δ‖ = " + fmt(norm),
              text: token.replace(/\n/g, "↵") });
          })));
      }));
      plot(bars, data.conditions.filter((c) => texts[c]).map((c, i) => {
        const text = texts[c];
        const row = text.norms[state.layer] || [];
        return { x: row.map((_, j) => j + 1), y: row, mode: "lines", name: c, line: { color: COLORS[i % COLORS.length] },
          text: row.map((_, j) => text.tokens[j + 1]), hovertemplate: "token %{x} %{text}: ‖Δ‖ %{y:.4g}<extra>" + c + "</extra>" };
      }), { title: { text: "sample #" + state.sample + ", layer " + state.layer + ": delta norm by token", font: { size: 13 } },
        xaxis: { title: { text: "response token" } }, yaxis: { title: { text: "‖Δ‖" } } });
    }
    const sampleSelect = select("token-sample", ids.map((id) => ({ value: id, label: "#" + id })), state.sample, (v) => { state.sample = v; draw(); });
    const node = section("tokens", "Token heatmap",
      el("p", { class: "hint", text: "Per response token, the norm of the residual-stream step that brought it (token i−1 → i) at the chosen layer; darker = larger. Hover a token for its value." }),
      el("div", { class: "controls" }, el("label", {}, "sample ", sampleSelect),
        el("label", {}, "layer ", select("token-layer", tokens.layers.map((l) => ({ value: String(l), label: String(l) })), state.layer, (v) => { state.layer = v; draw(); }))),
      scale, maps, bars);
    requestAnimationFrame(draw);
    node.pick = (id) => { if (tokens.texts[String(id)]) { state.sample = String(id); sampleSelect.value = state.sample; draw(); } };
    return node;
  }

  function diagnosticsSection() {
    const conditions = Object.keys(data.diagnostics);
    const row = (label, read) => [label, ...conditions.map((c) => fmt(read(data.diagnostics[c])))];
    const artifacts = conditions.length ? Object.keys(data.diagnostics[conditions[0]].artifact_share || {}) : [];
    return section("diagnostics", "Text diagnostics", table(["", ...conditions], [
      row("texts", (d) => d.n_texts),
      row("response tokens (mean, min–max)", (d) => fmt(d.response_tokens.mean) + " (" + fmt(d.response_tokens.min) + "–" + fmt(d.response_tokens.max) + ")"),
      row("repeated n-gram fraction (mean, max)", (d) => fmt(d.repeated_ngram_fraction.mean) + ", " + fmt(d.repeated_ngram_fraction.max)),
      row("stopped early", (d) => d.stopped_early_share),
      ...artifacts.map((name) => row("share with " + name.replace(/_/g, " "), (d) => d.artifact_share[name])),
      row("repetition vs " + data.primary.metric + " (r, p)", (d) => fmt(d.repetition_vs_metric.r) + ", " + fmt(d.repetition_vs_metric.p)),
    ], { id: "diagnostics-table" }));
  }

  // --- manifest -----------------------------------------------------------------------------

  function manifestSection() {
    const m = data.manifest;
    return section("manifest", "Manifest",
      table(["", ""], [
        ["run", m.run_id], ["started", m.started], ["spec", m.spec_file_in_repo || m.spec_file], ["spec hash", m.spec_hash],
        ["git commit", m.git_commit || "–"], ["harness", m.harness_version], ["processes × threads", fmt(m.processes) + " × " + fmt(m.threads)],
        ["overrides", (m.overrides || []).length ? (m.overrides || []).join("  ") : "none"],
      ], { class: "kv" }),
      el("h3", { text: "Models" }),
      table(["alias", "identity", "device", "source"], Object.entries(m.models || {}).map(([alias, model]) => [
        alias, el("code", { text: model.identity }), model.device || "–", keyValues(model.source)])),
      el("h3", { text: "Versions" }), keyValues(m.packages || {}),
      el("h3", { text: "Timings" }),
      table(["stage", "seconds", "cache"], Object.entries(m.timings || {}).map(([stage, seconds]) => [stage, fmt(seconds), (m.cache || {})[stage] || ""]),
        { id: "timings" }),
      el("details", {}, el("summary", { text: "Resolved spec (spec.yaml)" }), el("pre", { text: data.spec_yaml })));
  }

  // --- pages --------------------------------------------------------------------------------

  function runPage() {
    app.append(header(), criteriaSection("Criteria"), effectsSection());
    if (data.windows.length) app.append(windowsSection());
    if (data.directions.length) app.append(directionsSection());
    if (data.interventions) app.append(interventionsSection());
    const tokens = data.tokens ? tokensSection() : null;
    app.append(samplesSection((id) => tokens && tokens.pick(id)));
    if (tokens) app.append(tokens);
    if (data.diagnostics) app.append(diagnosticsSection());
    app.append(manifestSection());
  }

  function headlineText(h) {
    return fmt(h.d) + " [" + fmt(h.d_ci_low) + ", " + fmt(h.d_ci_high) + "], p " + fmt(h.p);
  }

  function sweepPage() {
    const names = data.points.length ? Object.keys(data.points[0].criteria) : [];
    const keys = data.points.length ? Object.keys(data.points[0].values) : [];
    app.append(header(), section("points", "Points", el("p", { class: "hint", text: "Each point is a run of its own: click it for its page." }),
      table(["point", ...keys, data.points[0].headline.metric + " d [CI], p", ...names], data.points.map((point) => [
        el("a", { class: "point-link", href: point.link, text: point.id }),
        ...keys.map((k) => fmt(point.values[k])),
        headlineText(point.headline),
        ...names.map((n) => badge(point.criteria[n] || "–")),
      ]), { id: "point-table" })));
    if (data.criteria.length) app.append(criteriaSection("Sweep criteria"));
  }

  if (data.kind === "sweep") sweepPage(); else runPage();
})();
