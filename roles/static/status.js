/* The status page's script (served by roles/web.py as /static/status.js).

   It polls /api/status every 3 s with If-None-Match, and only while the tab is visible: a tab left
   open in the background asks nothing, and a 304 costs the node a header compare. Only a new ETag
   rebuilds the page, and a run's chart is fetched again only when that run's chart version
   (chart_etags) changed.

   Every string in a snapshot comes from the swarm's peers, some of which may be hostile, so the
   page is built with createElement and text nodes only (no string is ever parsed as HTML),
   attributes are set only by name chosen here, and long strings are cut. */
"use strict";

(() => {
  const POLL_MS = 3000;
  const MAX_TEXT = 400; // a peer's string beyond this is cut (its full text stays in the title)

  let etag = null;
  let snapshot = null;
  let skew = 0; // the server's clock minus this browser's, in seconds (from each answer's Date header)
  let timer = null;
  let ticker = null;
  let inFlight = false;
  const charts = new Map(); // run index -> its <img>, kept across rebuilds so an unchanged chart never reloads

  // --- building blocks: elements and text only -------------------------------------------------------

  function el(tag, cls, ...children) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    for (const c of children) add(e, c);
    return e;
  }

  function add(parent, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) {
      for (const c of child) add(parent, c);
    } else if (child instanceof Node) {
      parent.appendChild(child);
    } else {
      parent.appendChild(document.createTextNode(String(child)));
    }
  }

  function text(value, max = MAX_TEXT) {
    if (value === null || value === undefined) return "";
    const s = typeof value === "string" ? value : typeof value === "object" ? JSON.stringify(value) : String(value);
    const chars = Array.from(s); // by code point: a cut never splits a character
    return chars.length > max ? chars.slice(0, max).join("") + "…" : s;
  }

  /** A span showing `shown`, with the whole value as its tooltip. */
  function abbr(shown, full, cls) {
    const s = el("span", cls, shown);
    s.title = text(full, 2000);
    return s;
  }

  function hex(value, n = 8) {
    const s = text(value, 200);
    return s ? abbr(s.slice(0, n), s, "hex") : "—";
  }

  function peer(value) {
    const s = text(value, 200);
    if (!s) return "—";
    return abbr(s.length > 14 ? "…" + s.slice(-10) : s, s, "peer");
  }

  function isNum(x) {
    return typeof x === "number" && Number.isFinite(x);
  }

  function num(x, digits = 1) {
    if (isNum(x)) return x.toFixed(digits);
    return x === null || x === undefined ? "—" : text(x, 40);
  }

  function lossText(x) {
    if (!isNum(x)) return num(x);
    return Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 0.001) ? x.toExponential(2) : x.toPrecision(4);
  }

  function int(x) {
    return isNum(x) ? Math.round(x).toLocaleString("en-US") : num(x);
  }

  function dur(seconds) {
    if (!isNum(seconds)) return "—";
    const s = Math.max(0, seconds);
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return Math.round(s / 86400) + " d";
  }

  function serverNow() {
    return Date.now() / 1000 + skew;
  }

  function when(unix) {
    if (!isNum(unix)) return "—";
    const t = el("time", "when", dur(serverNow() - unix) + " ago");
    const iso = new Date(unix * 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
    t.dateTime = iso;
    t.title = iso;
    return t;
  }

  function flops(x) {
    if (!isNum(x)) return num(x);
    const units = [["E", 1e18], ["P", 1e15], ["T", 1e12], ["G", 1e9], ["M", 1e6]];
    for (const [u, v] of units) if (Math.abs(x) >= v) return (x / v).toFixed(2) + " " + u + "FLOP";
    return Math.round(x) + " FLOP";
  }

  function badge(label, kind) {
    return el("span", "badge " + kind, label);
  }

  const REACH = { direct: "good", relayed: "warn", unreachable: "bad" };
  function reach(value) {
    const s = text(value, 60);
    return s ? badge(s, REACH[s] || "plain") : "—";
  }

  function list(items) {
    return Array.isArray(items) ? items : [];
  }

  /** A table: `headers` are strings (or [string, class]); each row is {cells, attrs, cls}. */
  function table(cls, headers, rows, empty) {
    if (!rows.length) return el("p", "none " + cls, empty);
    const t = el("table", cls);
    const head = el("tr");
    for (const h of headers) {
      const [label, hcls] = Array.isArray(h) ? h : [h, ""];
      head.appendChild(el("th", hcls, label));
    }
    t.appendChild(el("thead", "", head));
    const body = el("tbody");
    for (const r of rows) {
      const tr = el("tr", r.cls || "");
      for (const [name, value] of Object.entries(r.attrs || {})) tr.setAttribute(name, text(value, 200));
      r.cells.forEach((c, i) => {
        const h = headers[i];
        tr.appendChild(el("td", Array.isArray(h) ? h[1] : "", c));
      });
      body.appendChild(tr);
    }
    t.appendChild(body);
    return t;
  }

  function section(title, note, ...content) {
    return el("div", "part", el("h3", "", title, note ? el("span", "sub", " " + note) : null), content);
  }

  // --- one run ----------------------------------------------------------------------------------

  function facts(run) {
    const dl = el("dl", "facts");
    const item = (k, v) => add(dl, [el("dt", "", k), el("dd", "", v)]);
    const target = (what, n) => what + " " + (isNum(n) && n > 0 ? int(n) + " steps" : "no target");
    item("ref", text(run.ref));
    item("manifest", hex(run.manifest_sha256, 16));
    item("experts", num(run.num_clusters, 0));
    item("presets", list(run.presets).map((p) => text(p, 40)).join(", ") || "—");
    item("objectives", list(run.objectives).map((p) => text(p, 40)).join(", ") || "—");
    item("targets", target("experts", run.expert_steps) + " · " + target("router", run.router_steps));
    const admission = run.admission === "allowlist" ? "allowlist of " + int(run.allowed) : text(run.admission, 40) || "—";
    item("admission", admission);
    return dl;
  }

  function checkpoint(ck) {
    if (!ck || typeof ck !== "object") return "—";
    const providers = list(ck.providers).length;
    return el(
      "span",
      "ckpt",
      "step " + int(ck.step) + " · ",
      hex(ck.sha256),
      isNum(ck.age_s) ? " · " + dur(ck.age_s) + " ago" : "",
      " · " + providers + (providers === 1 ? " provider" : " providers"),
    );
  }

  function verdicts(ck) {
    if (!ck || typeof ck !== "object" || !list(ck.verdicts).length) return el("span", "muted", "none yet");
    const ul = el("ul", "verdicts");
    for (const v of list(ck.verdicts)) {
      const ok = v && v.ok === true;
      ul.appendChild(
        el(
          "li",
          ok ? "ok" : "refused",
          hex(v && v.verifier),
          " ",
          badge(ok ? "ok" : "refused", ok ? "good" : "bad"),
          isNum(v && v.loss) ? " held-out " + lossText(v.loss) : "",
          !ok && v && v.reason ? el("span", "reason", " " + text(v.reason)) : null,
        ),
      );
    }
    return ul;
  }

  function jobsTable(run) {
    const rows = list(run.jobs).map((j) => {
      const owner = j.owner ? [peer(j.owner), j.owner_key ? el("span", "key", " key ", hex(j.owner_key)) : null] : el("span", "muted", "unclaimed");
      const step = j.done
        ? [badge("done", "good"), " " + int(j.step) + " / " + int(j.target)]
        : int(j.step) + " / " + (isNum(j.target) && j.target > 0 ? int(j.target) : "—");
      return {
        attrs: { "data-job": j.job },
        cls: j.done ? "done" : "",
        cells: [
          text(j.job, 80),
          owner,
          step,
          lossText(j.loss),
          num(j.samples_per_s),
          isNum(j.step_age_s) ? dur(j.step_age_s) + " ago" : "—",
          checkpoint(j.checkpoint),
          verdicts(j.checkpoint),
          int(j.pending),
        ],
      };
    });
    const headers = [
      ["job", "id"], "owner", ["step / target", "n"], ["loss", "n"], ["samples/s", "n"], "last step",
      "last verified checkpoint", "verdicts", ["pending", "n"],
    ];
    return table("jobs", headers, rows, "no jobs listed");
  }

  function chart(run, index, version) {
    let img = charts.get(index);
    if (!img) {
      img = el("img", "chart");
      img.id = "chart-" + index;
      img.alt = "loss against step for every job of " + text(run.ref || run.name, 120);
      charts.set(index, img);
    }
    const src = "/chart/" + index + ".png?v=" + encodeURIComponent(text(version || "0", 80));
    if (img.getAttribute("src") !== src) img.src = src;
    return el("figure", "chart-box", img);
  }

  function serversTable(run) {
    const rows = list(run.servers).map((s) => ({
      attrs: { "data-expert": s.expert, "data-peer": s.peer },
      cells: [
        text(s.expert, 20),
        peer(s.peer),
        reach(s.reach),
        badge(text(s.state, 40) || "—", s.state === "online" ? "good" : "plain"),
        num(s.rps),
        int(s.queue),
        ["step " + int(s.step) + " · ", hex(s.ckpt)],
      ],
    }));
    const headers = ["expert", "server", "reach", "state", ["req/s", "n"], ["queue", "n"], "serving"];
    return table("servers", headers, rows, "no expert server online");
  }

  function peersTable(run) {
    const rows = list(run.peers).map((p) => ({
      attrs: { "data-peer": p.peer },
      cells: [
        peer(p.peer),
        reach(p.reach),
        text(p.role, 80),
        text(p.state, 80),
        text(p.job, 80) || "—",
        int(p.step),
        lossText(p.loss),
        num(p.samples_per_s),
      ],
    }));
    const headers = ["peer", "reach", "role", "state", "job", ["step", "n"], ["loss", "n"], ["samples/s", "n"]];
    return table("peers", headers, rows, "no peer reporting");
  }

  function ledger(run) {
    const lg = run.ledger && typeof run.ledger === "object" ? run.ledger : null;
    if (!lg) return el("p", "none ledger", "no ledger yet");
    const checked = lg.checked === true ? badge("checked out", "good") : lg.checked === false ? badge("did not check out", "bad") : badge("not checked", "plain");
    const summary = el(
      "p",
      "ledger-sum",
      "digest ",
      hex(lg.digest, 16),
      " · " + int(lg.entries) + " entries · ",
      checked,
      " · " + int(lg.total_steps) + " verified steps · " + flops(lg.total_flops) + " of training",
    );
    const contributors = list(lg.contributors);
    const jobs = [...new Set(contributors.flatMap((c) => (c && c.jobs && typeof c.jobs === "object" ? Object.keys(c.jobs) : [])))].sort();
    const rows = contributors.map((c) => {
      let share = "—";
      if (isNum(c.share)) {
        const m = el("meter");
        m.min = 0;
        m.max = 1;
        m.value = Math.min(1, Math.max(0, c.share));
        share = el("span", "share", m, " " + (c.share * 100).toFixed(1) + " %");
      }
      const perJob = jobs.map((j) => {
        const w = c.jobs && c.jobs[j];
        return w ? int(w.steps) + " / " + int(w.samples) : "—";
      });
      return { attrs: { "data-key": c.key }, cells: [hex(c.key, 16), ...perJob, share, flops(c.flops), when(c.first), when(c.last)] };
    });
    const headers = ["key", ...jobs.map((j) => [text(j, 40) + " steps / samples", "n"]), "share of FLOPs", ["FLOPs", "n"], "first", "last"];
    const problems = list(lg.problems);
    return [
      summary,
      table("ledger", headers, rows, "no verified contribution yet"),
      problems.length ? el("div", "problems-box", el("span", "sub", "problems found checking it:"), el("ul", "problems", problems.map((p) => el("li", "", text(p))))) : null,
    ];
  }

  function refused(run) {
    const items = [];
    for (const j of list(run.jobs)) {
      for (const r of list(j.refused)) {
        items.push(
          el("li", "", el("span", "what", text(j.job, 80) + " step " + int(r.step) + " "), hex(r.sha256), " from key ", hex(r.owner), ": ", el("span", "reason", text(r.reason))),
        );
      }
    }
    return items.length ? el("ul", "refused", items) : el("p", "none refused", "none");
  }

  function peerBans(run) {
    const items = [];
    for (const p of list(run.peers)) {
      for (const b of list(p.bans)) items.push(el("li", "", peer(p.peer), ": ", el("span", "reason", text(b))));
    }
    return items.length ? el("ul", "bans peer-bans", items) : el("p", "none bans", "none");
  }

  function renderRun(run, index, version) {
    const sec = el("section", "run panel");
    sec.id = "run-" + index;
    try {
      const owner = text(run.owner, 64);
      const title = el("h2", "", text(run.name, 80) || "run " + index, owner ? abbr(" @" + owner.slice(0, 12), owner, "owner") : null, " ", run.complete ? badge("complete", "good") : badge("training", "info"));
      add(sec, [
        title,
        facts(run),
        section("Jobs", ""),
        jobsTable(run),
        section("Loss", "training loss as lines, held-out loss at verified checkpoints as markers"),
        chart(run, index, version),
        section("Expert servers", ""),
        serversTable(run),
        section("Peers", ""),
        peersTable(run),
        section("Contribution ledger", "verified work per key"),
        ledger(run),
        section("Refused checkpoints", ""),
        refused(run),
        section("Bans reported by peers", ""),
        peerBans(run),
      ]);
    } catch (e) {
      add(sec, el("p", "error", "this run could not be shown: " + text(e && e.message)));
    }
    return sec;
  }

  // --- the page -----------------------------------------------------------------------------------

  function render(data) {
    snapshot = data;
    const runs = list(data.runs);
    const versions = list(data.chart_etags);
    const box = document.getElementById("runs");
    const built = runs.length ? runs.map((r, i) => renderRun(r && typeof r === "object" ? r : {}, i, versions[i])) : [el("p", "empty panel", "no run published yet")];
    for (const i of [...charts.keys()]) if (i >= runs.length) charts.delete(i);
    box.replaceChildren(...built);
    const self = document.getElementById("self");
    self.replaceChildren(data.self ? el("span", "", "node ", peer(data.self)) : "");
    const bans = list(data.bans);
    document.getElementById("bans").replaceChildren(...(bans.length ? bans.map((b) => el("li", "", text(b))) : [el("li", "none", "none")]));
    tick();
  }

  function tick() {
    const age = document.getElementById("age");
    if (!snapshot || !isNum(snapshot.time)) return;
    const seconds = serverNow() - snapshot.time;
    age.textContent = "snapshot " + dur(seconds) + " old";
    age.className = seconds > 15 ? "age stale" : "age";
  }

  function setConn(message) {
    const conn = document.getElementById("conn");
    conn.textContent = message;
    conn.className = message ? "conn bad" : "conn";
  }

  function readSkew(response) {
    const date = Date.parse(response.headers.get("Date") || "");
    if (Number.isFinite(date)) {
      const s = (date - Date.now()) / 1000;
      skew = Math.abs(s) > 2 ? s : 0; // the header has whole seconds: smaller differences are its rounding
    }
  }

  async function poll() {
    timer = null;
    if (document.visibilityState !== "visible" || inFlight) return;
    inFlight = true;
    try {
      // Setting If-None-Match ourselves makes the browser pass a 304 through instead of answering from its cache.
      const response = await fetch("/api/status", { cache: "no-cache", headers: etag ? { "If-None-Match": etag } : {} });
      readSkew(response);
      if (response.status === 200) {
        const data = await response.json();
        etag = response.headers.get("ETag");
        render(data);
        document.body.dataset.etag = etag || "";
        setConn("");
      } else if (response.status === 304) {
        setConn("");
      } else {
        setConn("the status node answered " + response.status);
      }
    } catch (e) {
      setConn("cannot reach the status node; retrying");
    } finally {
      inFlight = false;
      schedule();
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = document.visibilityState === "visible" ? setTimeout(poll, POLL_MS) : null;
  }

  function visibility() {
    if (document.visibilityState === "visible") {
      if (!timer && !inFlight) poll();
      if (!ticker) ticker = setInterval(tick, 1000);
    } else {
      clearTimeout(timer);
      timer = null;
      clearInterval(ticker);
      ticker = null;
    }
  }

  document.addEventListener("visibilitychange", visibility);
  visibility();
})();
