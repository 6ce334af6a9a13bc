// MoMA-FL dashboard: polls /api/run/<name> and renders it. Every string from the server is
// inserted as text (textContent, attribute setters): never as markup.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const params = new URLSearchParams(location.search);
  const POLL_MS = Math.max(250, Number(params.get("poll")) || 2000);
  const COLORS = ["#1570ef", "#dc6803", "#079455", "#d92d20", "#7a5af8", "#0e9384",
                  "#c11574", "#667085"];
  let current = null;   // the run shown
  let lastState = null;
  let timer = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    return e;
  }

  function setText(id, text) { $(id).textContent = text === null || text === undefined ? "–" : String(text); }

  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    return typeof v === "number" ? v.toFixed(digits === undefined ? 3 : digits) : String(v);
  }

  function mb(bytes) { return fmt(bytes / 1e6, 2); }

  function when(t) {
    if (t === null || t === undefined) return "–";
    return new Date(t * 1000).toLocaleString();
  }

  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Math.round(s));
    const m = Math.floor(s / 60);
    return m ? m + " min " + (s % 60) + " s" : s + " s";
  }

  function siteColor(i) { return "hsl(" + ((i * 137.508) % 360).toFixed(1) + ",65%,45%)"; }

  // -- plots: one SVG per panel, lines over rounds, nulls break a line -------------------------
  function plot(container, xs, series, opts) {
    opts = opts || {};
    const W = 560, H = 220, L = 48, R = 10, T = 10, B = 28;
    const box = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
    const label = svg("title", {});
    label.textContent = opts.title || "";
    box.appendChild(label);
    let lo = Infinity, hi = -Infinity;
    for (const s of series) for (const v of s.values) if (v !== null && v !== undefined) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    for (const h of opts.hlines || []) { lo = Math.min(lo, h.y); hi = Math.max(hi, h.y); }
    if (opts.ymin !== undefined) lo = Math.min(lo, opts.ymin);
    if (opts.ymax !== undefined) hi = Math.max(hi, opts.ymax);
    if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) { hi = lo + 1; }
    const x0 = xs.length ? xs[0] : 1, x1 = xs.length > 1 ? xs[xs.length - 1] : x0 + 1;
    const px = (x) => L + (W - L - R) * (x - x0) / (x1 - x0);
    const py = (y) => T + (H - T - B) * (1 - (y - lo) / (hi - lo));
    const axes = svg("g", { stroke: "#d0d5dd", "stroke-width": 1 });
    for (let i = 0; i <= 4; i++) {
      const y = lo + (hi - lo) * i / 4;
      axes.appendChild(svg("line", { x1: L, x2: W - R, y1: py(y), y2: py(y) }));
      const t = svg("text", { x: L - 4, y: py(y) + 4, "text-anchor": "end", stroke: "none" });
      t.textContent = Math.abs(hi - lo) >= 100 ? y.toFixed(0) : y.toPrecision(3);
      axes.appendChild(t);
    }
    const step = Math.max(1, Math.ceil((x1 - x0) / 10));
    for (let x = x0; x <= x1; x += step) {
      const t = svg("text", { x: px(x), y: H - 8, "text-anchor": "middle", stroke: "none" });
      t.textContent = String(x);
      axes.appendChild(t);
    }
    box.appendChild(axes);
    for (const h of opts.hlines || []) {
      box.appendChild(svg("line", { x1: L, x2: W - R, y1: py(h.y), y2: py(h.y), stroke: "#98a2b3",
                                    "stroke-dasharray": "5 4", "stroke-width": 1.2 }));
      const t = svg("text", { x: W - R - 2, y: py(h.y) - 3, "text-anchor": "end" });
      t.textContent = h.label;
      box.appendChild(t);
    }
    for (const s of series) {
      const g = svg("g", { class: "series" });
      const name = svg("title", {});
      name.textContent = s.name;
      g.appendChild(name);
      let pts = [];
      const flush = () => {
        if (pts.length === 1) {
          const [x, y] = pts[0].split(",");
          g.appendChild(svg("circle", { cx: x, cy: y, r: 2.5, fill: s.color }));
        } else if (pts.length > 1) {
          g.appendChild(svg("polyline", { points: pts.join(" "), fill: "none", stroke: s.color,
                                          "stroke-width": s.width || 1.6,
                                          "stroke-dasharray": s.dash || "none" }));
        }
        pts = [];
      };
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) flush();
        else pts.push(px(xs[i]).toFixed(1) + "," + py(v).toFixed(1));
      });
      flush();
      box.appendChild(g);
    }
    container.replaceChildren(box);
    if (opts.legend !== false && series.length <= 8) {
      const ul = el("ul", null, "legend");
      for (const s of series) ul.appendChild(legendItem(s.name, s.color));
      container.appendChild(ul);
    }
  }

  function legendItem(name, color) {
    const li = el("li");
    const sw = el("span", null, "swatch");
    sw.style.backgroundColor = color;
    li.appendChild(sw);
    li.appendChild(document.createTextNode(name));
    return li;
  }

  function row(cells, attrs) {
    const tr = el("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
    for (const k in attrs || {}) tr.setAttribute(k, String(attrs[k]));
    return tr;
  }

  function fill(tbodyParent, rows, empty) {
    const body = $(tbodyParent).tBodies[0];
    if (!rows.length && empty) {
      const td = el("td", empty, "muted");
      td.colSpan = 10;
      rows = [row([td])];
    }
    body.replaceChildren(...rows);
  }

  // -- sections ---------------------------------------------------------------------------
  function renderLive(st) {
    const live = st.live || {};
    const badge = $("run-state");
    badge.textContent = st.state;
    badge.className = "badge " + String(st.state).replace(/[^a-z-]/g, "");
    setText("live-state", live.state);
    setText("live-round", live.round);
    setText("live-rounds", live.num_rounds);
    const inRound = live.round_started && (live.state === "training" || live.state === "evaluating");
    const age = (Date.now() / 1000 - st.fetched) || 0;
    setText("live-elapsed", inRound ? duration(st.now + age - live.round_started) : "–");
    setText("live-timeout", live.round_timeout ? duration(live.round_timeout) : "–");
    setText("live-connected", live.connected === null || live.connected === undefined ? "–"
      : live.connected + (live.min_nodes ? " (needs " + live.min_nodes + ")" : ""));
    const training = (live.sites || []).filter((s) => s.status === "training")
      .map((s) => s.site_name || s.node_id);
    setText("live-training", training.length ? training.join(", ") : "–");
    setText("live-waiting", (live.waiting_for || []).length ? live.waiting_for.join(", ") : "–");
    const end = live.end ? " — ended: " + [live.end.status, live.end.reason].filter(Boolean).join(", ") : "";
    setText("live-message", (live.message || (live.derived ? "(no live.json: from results.json)" : "")) + end || "–");
  }

  function globalSource(rounds) {
    return rounds.some((r) => r.server_eval) ? "server_eval" : "federated_eval";
  }

  function renderLatest(st) {
    const done = st.rounds;
    const src = globalSource(done);
    const last = [...done].reverse().find((r) => r[src]);
    // without a coordinator held-out set, a round's student is scored by the sites at the
    // start of the next round: the latest scored round trails the last completed one
    setText("latest-round", last ? last.round
      : (done.length ? "– (sites score each student at the start of the next round)" : "–"));
    const cards = [];
    const m = last ? last[src] : {};
    for (const [k, label] of [["accuracy", "accuracy"], ["macro_f1", "macro-F1"], ["kappa", "kappa"]]) {
      const c = el("div", null, "card");
      c.appendChild(el("div", label, "muted"));
      const v = el("div", fmt(m[k]), "v");
      v.id = "latest-" + k.replace("_", "-");
      c.appendChild(v);
      cards.push(c);
    }
    if (st.chance) {
      const c = el("div", null, "card");
      c.appendChild(el("div", "chance accuracy", "muted"));
      c.appendChild(el("div", fmt(st.chance), "v"));
      cards.push(c);
    }
    $("latest-cards").replaceChildren(...cards);
  }

  function renderGlobal(st) {
    const rounds = st.rounds, xs = rounds.map((r) => r.round);
    const src = globalSource(rounds);
    setText("global-source", src === "server_eval" ? "server_eval" : "none: sites' validation");
    const pick = (key, m) => rounds.map((r) => (r[key] ? r[key][m] : null));
    const hlines = [{ y: 0, label: "chance kappa 0" }];
    if (st.chance) hlines.push({ y: st.chance, label: "chance accuracy " + fmt(st.chance, 2) });
    plot($("plot-global"), xs, [
      { name: "accuracy", values: pick(src, "accuracy"), color: COLORS[0] },
      { name: "macro-F1", values: pick(src, "macro_f1"), color: COLORS[1] },
      { name: "kappa", values: pick(src, "kappa"), color: COLORS[2] },
      { name: "site val accuracy", values: pick("federated_eval", "accuracy"), color: COLORS[7],
        dash: "2 3", width: 1.2 },
    ], { hlines, ymax: 1, title: "global metrics" });
    const rows = rounds.slice(-12).reverse().map((r) => {
      const g = r[src] || {};
      return row([String(r.round), r.status, fmt(g.accuracy), fmt(g.macro_f1), fmt(g.kappa),
                  fmt(r.federated_eval ? r.federated_eval.accuracy : null),
                  r.sites_ok + "/" + r.sites_total, mb(r.bytes_down), mb(r.bytes_up),
                  fmt(r.wall_s, 1)], { "data-round": r.round });
    });
    fill("rounds-table", rows, "no round completed yet");
  }

  function renderSites(st) {
    const xs = st.rounds.map((r) => r.round);
    const metric = $("site-metric").value;
    const series = st.site_series.map((s, i) => ({ name: s.name, values: s[metric], color: siteColor(i),
                                                   width: 1.2 }));
    const hlines = metric === "accuracy" && st.chance ? [{ y: st.chance, label: "chance" }]
      : metric === "kappa" ? [{ y: 0, label: "chance" }] : [];
    plot($("plot-sites"), xs, series, { hlines, ymax: 1, legend: false, title: "per-site " + metric });
    $("sites-legend").replaceChildren(...series.map((s) => legendItem(s.name, s.color)));

    const bySeries = new Map(st.site_series.map((s) => [s.name, s]));
    const names = new Set(st.sites.map((s) => s.name));
    const registry = [...st.sites];
    for (const s of st.site_series) if (!names.has(s.name)) registry.push({ name: s.name });
    registry.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const rows = registry.map((s) => {
      const ser = bySeries.get(s.name) || {};
      const status = (ser.status || []).filter((v) => v !== null);
      const reasons = (ser.reason || []).filter((v) => v !== null);
      const last = status.length ? status[status.length - 1] : null;
      const failures = Object.entries(ser.failures || {}).map(([k, v]) => k + " × " + v).join(", ");
      const online = el("td", s.online === null || s.online === undefined ? "–"
        : s.online ? "online" : "offline", s.online ? "online" : s.online === false ? "offline" : "");
      return row([s.name, s.registered ? String(s.registered).slice(0, 19) : "–",
                  s.revoked ? String(s.revoked).slice(0, 19) : "–", online, when(s.last_seen),
                  last === null ? "–" : last + (last !== "ok" && reasons.length ? " (" + reasons[reasons.length - 1] + ")" : ""),
                  ser.epsilon === null || ser.epsilon === undefined ? "–"
                    : fmt(ser.epsilon, 2) + " (round " + ser.epsilon_round + ")",
                  failures || "–", ser.bytes_down === undefined ? "–" : mb(ser.bytes_down),
                  ser.bytes_up === undefined ? "–" : mb(ser.bytes_up)], { "data-site": s.name });
    });
    fill("sites-table", rows, "no site known yet");
  }

  function renderTerms(st) {
    const xs = st.rounds.map((r) => r.round);
    const t = (k) => st.rounds.map((r) => r.terms[k]);
    plot($("plot-terms"), xs, [
      { name: "CE", values: t("train-ce"), color: COLORS[0] },
      { name: "KL", values: t("train-kl"), color: COLORS[1] },
      { name: "NCE", values: t("train-nce"), color: COLORS[2] },
      { name: "NCE (shuffled positives)", values: t("train-nce-shuffled"), color: COLORS[2], dash: "4 3" },
      { name: "retrieval", values: t("train-retrieval"), color: COLORS[4] },
    ], { ymin: 0, title: "loss terms" });
    plot($("plot-bytes"), xs, [
      { name: "MB down", values: st.rounds.map((r) => r.bytes_down / 1e6), color: COLORS[0] },
      { name: "MB up", values: st.rounds.map((r) => r.bytes_up / 1e6), color: COLORS[1] },
    ], { ymin: 0, title: "bytes" });
  }

  function renderOther(st) {
    fill("failures-table", Object.entries(st.failures).map(([k, v]) => row([k, String(v)])),
         "no failure");
    const teacher = st.teacher || {};
    setText("teacher-sha", teacher.sha256 || "none (no teacher)");
    setText("teacher-signer", teacher.signer || "–");
    let sig = teacher.signature || "–";
    if (teacher.federation_key === true) sig += "; the federation's signing key";
    if (teacher.federation_key === false) sig += "; NOT the federation's signing key";
    setText("teacher-signature", sig);
    const c = st.client_dp;
    setText("client-dp", c ? "ε " + fmt(c.epsilon) + ", δ " + c.delta + " after " + c.releases
                             + " release(s), " + c.mechanism : "off");
    setText("config", Object.entries(st.config).map(([k, v]) => k + "=" + v).join("  "));
    fill("security-table", (st.security || []).slice().reverse().map((e) =>
      row([e.time, e.event, e.site, e.key_sha256.slice(0, 16), e.holder, e.peer])), "none");
  }

  function render(st) {
    const t0 = performance.now();
    renderLive(st);
    renderLatest(st);
    renderGlobal(st);
    renderSites(st);
    renderTerms(st);
    renderOther(st);
    setText("updated", "updated " + new Date().toLocaleTimeString());
    const b = document.body;
    b.dataset.run = st.name;
    b.dataset.rounds = String(st.rounds.length);
    b.dataset.liveRound = st.live && st.live.round !== null && st.live.round !== undefined ? String(st.live.round) : "";
    b.dataset.renderMs = (performance.now() - t0).toFixed(1);
    b.dataset.rendered = performance.now().toFixed(1);  // ms since navigation start
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return r.json();
  }

  async function refreshRuns() {
    const data = await getJSON("/api/runs");
    const want = decodeURIComponent(location.hash.slice(1)) || current || data.current
      || (data.runs[0] && data.runs[0].name);
    const sel = $("run-select");
    sel.replaceChildren(...data.runs.map((r) => {
      const o = el("option", r.name + " (" + r.state + ", " + r.rounds + " rounds)");
      o.value = r.name;
      return o;
    }));
    if (want) sel.value = want;
    current = want || null;
  }

  async function tick() {
    clearTimeout(timer);
    try {
      if (current === null) await refreshRuns();
      if (current !== null) {
        const st = await getJSON("/api/run/" + encodeURIComponent(current));
        st.fetched = Date.now() / 1000;
        lastState = st;
        render(st);
      }
      $("error").hidden = true;
    } catch (e) {
      const err = $("error");
      err.textContent = String(e.message || e);
      err.hidden = false;
    }
    timer = setTimeout(tick, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("run-select").addEventListener("change", (ev) => {
      current = ev.target.value;
      location.hash = encodeURIComponent(current);
      tick();
    });
    $("site-metric").addEventListener("change", () => { if (lastState) renderSites(lastState); });
    setInterval(() => { refreshRuns().catch(() => {}); }, Math.max(POLL_MS, 10000));
    tick();
  });
})();
