"use strict";
// bidmesh dashboard: polls the node's read-only JSON API and renders tables.
// Values are always inserted as text (never as HTML).
(function () {
  const POLL_MS = 2000;
  const DETAIL_AUCTIONS = 5;
  const growth = [];

  function $(id) { return document.getElementById(id); }
  function short(hex) { return hex ? hex.slice(0, 12) : "-"; }
  function fmtTime(ms) {
    if (ms === null || ms === undefined) { return "-"; }
    return new Date(ms).toISOString().replace("T", " ").slice(0, 19);
  }
  function fmtBytes(n) {
    if (n === null || n === undefined) { return "-"; }
    const units = [["GiB", 1 << 30], ["MiB", 1 << 20], ["KiB", 1 << 10]];
    for (const [u, f] of units) { if (n >= f) { return (n / f).toFixed(1) + " " + u; } }
    return n + " B";
  }
  // The one reputation format (as node/auction/views.py rep_text): "66.7% (3 ratings)".
  function pct(score) {
    if (!score) { return "-"; }
    if (!score.ratings) { return "new (0 ratings)"; }
    return (score.score_ppm / 10000).toFixed(1) + "% (" + score.ratings + " rating" +
      (score.ratings === 1 ? "" : "s") + ")";
  }
  // A recipient's payment record as of the auction's start (views.record_text).
  function recText(r) {
    if (!r) { return "-"; }
    let s = pct(r);
    if (r.ratings) { s += ", " + r.paid + " paid / " + r.unpaid + " unpaid"; }
    if (r.open_unpaid) { s += ", " + r.open_unpaid + " open unpaid"; }
    return s;
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "-" : String(text);
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }
  function fill(tableId, rows, render, empty) {
    const tbody = $(tableId).querySelector("tbody");
    tbody.replaceChildren();
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = cell(tr, empty, "muted");
      td.colSpan = $(tableId).querySelectorAll("th").length;
      tbody.appendChild(tr);
      return;
    }
    for (const row of rows) {
      const tr = document.createElement("tr");
      render(tr, row);
      tbody.appendChild(tr);
    }
  }

  async function get(path) {
    const resp = await fetch(path, { cache: "no-store" });
    if (!resp.ok) { throw new Error(path + ": HTTP " + resp.status); }
    return resp.json();
  }

  function renderSummary(digest, health, peers) {
    $("summary").textContent = "network " + digest.network + " · " + digest.events +
      " events · " + digest.authors + " authors · " + peers.peers.length + " peers · digest " +
      short(digest.digest) + " · " + (health.ok ? "running" : health.state);
  }

  function renderAuctions(auctions) {
    fill("auctions", auctions, (tr, a) => {
      tr.dataset.id = a.id;
      cell(tr, short(a.id), "mono");
      cell(tr, a.service);
      cell(tr, short(a.recipient) + " · " + recText(a.recipient_record));
      cell(tr, a.rule + (a.sealed ? " sealed" : "") + (a.group ? " group" : ""));
      cell(tr, a.status, "status-" + a.status);
      cell(tr, fmtTime(a.close_ms));
      cell(tr, a.bids, "num");
      cell(tr, a.reserve + " " + a.currency, "num");
      cell(tr, short(a.winner), "mono");
      cell(tr, a.price, "num");
    }, "no auctions yet");
  }

  function renderDetails(details) {
    const box = $("auction-details");
    box.replaceChildren();
    for (const a of details) {
      const h = document.createElement("h3");
      h.textContent = "Bids on " + short(a.id) + " (" + a.service + ", " + a.status +
        "; recipient paid: " + recText(a.recipient_record) + ")";
      box.appendChild(h);
      const table = document.createElement("table");
      const head = document.createElement("tr");
      for (const t of ["bid", "provider", "price", "status", "reputation", "satisfied"]) {
        const th = document.createElement("th");
        th.textContent = t;
        head.appendChild(th);
      }
      table.appendChild(head);
      if (!a.bid_list.length) {
        const tr = document.createElement("tr");
        const td = cell(tr, "no bids yet", "muted");
        td.colSpan = 6;
        table.appendChild(tr);
      }
      for (const b of a.bid_list) {
        const tr = document.createElement("tr");
        if (b.winner) { tr.className = "winner"; }
        cell(tr, short(b.id), "mono");
        cell(tr, short(b.provider), "mono");
        cell(tr, b.price, "num");
        cell(tr, b.status + (b.winner ? " (winner)" : ""));
        cell(tr, pct(b.reputation), "num");
        cell(tr, b.reputation.satisfied, "num");
        table.appendChild(tr);
      }
      box.appendChild(table);
    }
  }

  function renderLeases(leases) {
    fill("leases", leases, (tr, l) => {
      const live = l.live || {};
      const used = l.usage.length ? l.usage[l.usage.length - 1] : null;
      const sum = (k) => used ? used.members.reduce((s, m) => s + m[k], 0) : null;
      cell(tr, short(l.id), "mono");
      cell(tr, l.service);
      cell(tr, short(l.provider), "mono");
      cell(tr, short(l.recipient), "mono");
      cell(tr, fmtTime(l.start_ms) + " → " + fmtTime(l.end_ms));
      cell(tr, l.price + " " + l.currency, "num");
      cell(tr, l.paid, "num");
      cell(tr, l.active ? "yes" : "no");
      cell(tr, fmtBytes(live.bytes_in !== undefined ? live.bytes_in : sum("bytes_in")), "num");
      cell(tr, fmtBytes(live.bytes_out !== undefined ? live.bytes_out : sum("bytes_out")),
           "num");
      cell(tr, live.segments !== undefined ? live.segments : sum("segments"), "num");
      cell(tr, l.ratings.length, "num");
    }, "no leases yet");
  }

  function renderReputation(rep) {
    rep.sort((a, b) => b.provider.ratings + b.recipient.ratings -
                       a.provider.ratings - a.recipient.ratings);
    fill("reputation", rep, (tr, r) => {
      cell(tr, short(r.key), "mono");
      cell(tr, pct(r.provider), "num");
      cell(tr, pct(r.recipient), "num");
    }, "no ratings yet");
  }

  function renderPeers(peers) {
    const ul = $("peers");
    ul.replaceChildren();
    const items = peers.peers.length ? peers.peers : ["(no peers connected)"];
    for (const p of items) {
      const li = document.createElement("li");
      li.className = "mono";
      li.textContent = p + (peers.blocked && peers.blocked[p] ? " (blocked)" : "");
      ul.appendChild(li);
    }
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "sync rounds " + (peers.sync.rounds || 0) + ", failed " +
      (peers.sync.failed || 0) + ", pending " + (peers.pending || 0);
    ul.appendChild(li);
  }

  function renderGrowth(serverSamples, events) {
    growth.push({ time: Date.now() / 1000, events: events });
    while (growth.length > 300) { growth.shift(); }
    const pts = serverSamples.length >= growth.length ? serverSamples : growth;
    const svg = $("growth");
    svg.replaceChildren();
    if (pts.length < 2) {
      $("growth-label").textContent = events + " events";
      return;
    }
    const t0 = pts[0].time, t1 = pts[pts.length - 1].time;
    const lo = Math.min(...pts.map((p) => p.events));
    const hi = Math.max(...pts.map((p) => p.events));
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts.map((p) => {
      const x = t1 > t0 ? (p.time - t0) / (t1 - t0) * 300 : 0;
      const y = hi > lo ? 78 - (p.events - lo) / (hi - lo) * 76 : 40;
      return x.toFixed(1) + "," + y.toFixed(1);
    }).join(" "));
    svg.appendChild(line);
    const span = Math.max(1, Math.round(t1 - t0));
    $("growth-label").textContent = lo + " → " + hi + " events over " + span + " s";
  }

  function showError(err) {
    const b = $("banner");
    if (err) {
      b.textContent = "cannot reach the node API: " + err.message;
      b.hidden = false;
    } else {
      b.hidden = true;
    }
  }

  async function refresh() {
    try {
      const [digest, health, auctions, leases, rep, peers, samples] = await Promise.all([
        get("/api/digest"), get("/api/health"), get("/api/auctions?limit=50"),
        get("/api/leases"), get("/api/reputation"), get("/api/peers"), get("/api/growth"),
      ]);
      const details = await Promise.all(
        auctions.slice(0, DETAIL_AUCTIONS).map((a) => get("/api/auctions/" + a.id)));
      renderSummary(digest, health, peers);
      renderAuctions(auctions);
      renderDetails(details);
      renderLeases(leases);
      renderReputation(rep);
      renderPeers(peers);
      renderGrowth(samples, digest.events);
      showError(null);
    } catch (err) {
      showError(err);
    }
  }

  function loop() {
    refresh().finally(() => { window.setTimeout(loop, POLL_MS); });
  }
  document.addEventListener("DOMContentLoaded", loop);
}());
