// bucketlens dashboard: polls /api/summary and redraws. Every value that came from a row is set
// with textContent or as an attribute value, never parsed as HTML: names and labels are
// chosen by whoever uploads.
"use strict";

const POLL_MS = 2000;
let throughputChart = null;
let classChart = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function thumb(row) {
  const img = document.createElement("img");
  img.src = row.thumb;  // same-origin URL the server built (URL-encoded name)
  img.alt = row.name;
  img.loading = "lazy";
  return img;
}

function pct(p) { return p === null || p === undefined ? "" : (100 * p).toFixed(1) + " %"; }

function renderNewest(rows) {
  const box = document.getElementById("newest");
  box.replaceChildren(...rows.map((r) => {
    const ok = r.status === "ok" || r.status === "low_confidence";
    const card = el("div", null, ok ? "card" : "card error");
    card.dataset.name = r.name;
    card.append(thumb(r), el("div", ok ? r.top1_label : r.status, "label"),
                el("div", ok ? pct(r.top1_prob) : r.reason, "prob"), el("div", r.name, "name"));
    return card;
  }));
}

function renderTable(id, rows, cells) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map((r) => {
    const tr = el("tr");
    for (const c of cells(r)) {
      const td = el("td");
      if (c instanceof Node) td.append(c); else td.textContent = c === null ? "" : String(c);
      tr.append(td);
    }
    return tr;
  }));
}

function renderCharts(data) {
  if (typeof Chart === "undefined") return;
  const minutes = data.per_minute.map((r) => r.minute.slice(11, 16));
  const images = data.per_minute.map((r) => r.images);
  const latency = data.per_minute.map((r) => r.latency_s);
  if (!throughputChart) {
    throughputChart = new Chart(document.getElementById("throughput"), {
      type: "bar",
      data: { labels: [], datasets: [
        { label: "images", data: [], yAxisID: "y" },
        { label: "latency s", data: [], type: "line", yAxisID: "y1" } ] },
      options: { animation: false, scales: { y: { beginAtZero: true },
                 y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false } } } },
    });
    classChart = new Chart(document.getElementById("classes"), {
      type: "bar", data: { labels: [], datasets: [{ label: "images", data: [] }] },
      options: { animation: false, indexAxis: "y" },
    });
  }
  throughputChart.data.labels = minutes;
  throughputChart.data.datasets[0].data = images;
  throughputChart.data.datasets[1].data = latency;
  throughputChart.update();
  classChart.data.labels = data.class_mix.map((r) => r.label);  // Chart.js draws text on canvas
  classChart.data.datasets[0].data = data.class_mix.map((r) => r.n);
  classChart.update();
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const response = await fetch("/api/summary", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    const data = await response.json();
    document.getElementById("source").textContent = `${data.table} · gs://${data.bucket}`;
    document.getElementById("minutes").textContent = data.minutes;
    document.getElementById("review-below").textContent = pct(data.review_below);
    renderNewest(data.newest);
    renderTable("review", data.review, (r) => [thumb(r), r.name, r.top1_label, pct(r.top1_prob)]);
    renderTable("dead-letters", data.dead_letters, (r) => [r.recorded_at, r.reason, r.message_id]);
    renderCharts(data);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    error.hidden = true;
  } catch (e) {
    error.textContent = `cannot refresh: ${e.message}`;
    error.hidden = false;
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
