// The dashboard's charts, drawn on <canvas> by hand: a line chart with a value axis and a
// legend (overview), and a sparkline (link quality). Values are oldest first; the newest sits
// at the right edge; null leaves a gap.

import { fmtNumber, POLL_MS } from "./lib.js";

// The value axis for data up to `value`: a "nice" ceiling (1, 2 or 5 times a power of ten)
// and a number of divisions that keeps the tick labels round (0.2, 0.5 or 1 of that power).
export function niceMax(value) {
  return valueAxis(value).max;
}

function valueAxis(value) {
  if (!(value > 0)) return { max: 1, divisions: 5 };
  const exp = Math.pow(10, Math.floor(Math.log10(value)));
  for (const [m, divisions] of [[1, 5], [2, 4], [5, 5], [10, 5]]) {
    if (value <= m * exp * (1 + 1e-9)) return { max: m * exp, divisions };
  }
  return { max: 10 * exp, divisions: 5 };
}

// How many samples the x axis spans: all of them once `slots` are kept, but at least
// `minimum`, so that a chart that has just started is not a dot at the right edge.
function span(n, slots, minimum) {
  return Math.min(slots, Math.max(n, minimum));
}

function fitCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, width, height };
}

function agoLabel(samples) {
  const seconds = Math.round((samples * POLL_MS) / 1000);
  return seconds < 120 ? `${seconds} s ago` : `${Math.round(seconds / 60)} min ago`;
}

// One polyline per series; null values leave gaps.
function plot(ctx, values, { x0, width, y0, height, max, slots }) {
  const step = width / Math.max(1, slots - 1);
  const n = values.length;
  ctx.beginPath();
  let pen = false;
  values.forEach((v, i) => {
    if (v === null || v === undefined || n - 1 - i >= slots) {
      pen = false;
      return;
    }
    const x = x0 + width - (n - 1 - i) * step;
    const y = y0 + height - (height * Math.min(v, max)) / max;
    if (pen) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
    pen = true;
  });
  ctx.stroke();
}

// series: [{label, color, values: [number | null]}], all of the same length (oldest first);
// slots: how many samples the chart keeps at most (the newest sits at the right edge).
export function drawChart(canvas, series, slots) {
  const { ctx, width, height } = fitCanvas(canvas);
  if (width === 0 || height === 0) return;
  const left = 46, right = 10, bottom = 18, lineHeight = 16;
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left"; // the context keeps its state between draws

  // Legend first (a swatch, the label and the newest value of each series), wrapped to the
  // width: the plot starts below however many lines it takes.
  const items = series.map((s) => {
    const latest = s.values.length ? s.values[s.values.length - 1] : null;
    const text = `${s.label} ${fmtNumber(latest)}`;
    return { s, text, w: 14 + ctx.measureText(text).width + 14 };
  });
  let x = left, line = 0;
  for (const item of items) {
    if (x > left && x + item.w > width - right) {
      x = left;
      line += 1;
    }
    ctx.fillStyle = item.s.color;
    ctx.fillRect(x, 8 + line * lineHeight, 10, 10);
    ctx.fillStyle = "#111827";
    ctx.fillText(item.text, x + 14, 13 + line * lineHeight);
    x += item.w;
  }
  const top = 8 + (line + 1) * lineHeight + 4;
  const plotW = width - left - right, plotH = height - top - bottom;
  if (plotH <= 0) return;

  let peak = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > peak) peak = v;
  const { max, divisions } = valueAxis(peak);
  for (let i = 0; i <= divisions; i++) {
    const y = Math.round(top + plotH - (plotH * i) / divisions) + 0.5;
    ctx.strokeStyle = i === 0 ? "#9ca3af" : "#e5e7eb";
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(left + plotW, y);
    ctx.stroke();
    ctx.fillStyle = "#6b7280";
    ctx.textAlign = "right";
    ctx.fillText(fmtNumber((max * i) / divisions), left - 6, y);
  }
  const n = series.length ? series[0].values.length : 0;
  const shown = span(n, slots, 30);
  ctx.textAlign = "left";
  ctx.fillText(agoLabel(shown - 1), left, height - 8);
  ctx.textAlign = "right";
  ctx.fillText("now", left + plotW, height - 8);

  ctx.lineWidth = 1.6;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    plot(ctx, s.values, { x0: left, width: plotW, y0: top, height: plotH, max, slots: shown });
  }
  ctx.lineWidth = 1;
  canvas.dataset.samples = String(n);
}

// A small line without axes; `fixedMax` (optional) pins the top of the scale.
export function drawSparkline(canvas, values, slots, color, fixedMax) {
  const { ctx, width, height } = fitCanvas(canvas);
  const finite = values.filter((v) => v !== null);
  if (finite.length === 0) return;
  const max = fixedMax || niceMax(Math.max(...finite));
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.2;
  plot(ctx, values, { x0: 1, width: width - 2, y0: 1, height: height - 2, max, slots: span(values.length, slots, 20) });
}
