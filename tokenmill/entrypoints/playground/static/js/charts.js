// Line charts drawn as SVG: lineChart(title, series, options) -> <svg>. Each series is {name, points: [[x, y]]};
// options: xLabels (category names, x being their index), yMax (a floor for the y range), yFormat, xFormat.

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#3056d3", "#e67e22", "#1e8449", "#8e44ad", "#c0392b", "#16a085"];
const WIDTH = 480;
const HEIGHT = 220;
const PAD = {left: 48, right: 12, top: 24, bottom: 34};

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 2.5, 5, 10].map((m) => m * step).find((m) => m >= value);
}

export function lineChart(title, series, {xLabels, yMax = 0, yFormat = (v) => `${+v.toFixed(2)}`,
  xFormat = (v) => `${+v.toFixed(1)}`} = {}) {
  const svg = el("svg", {viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "img", "aria-label": title});
  svg.append(el("text", {x: PAD.left, y: 14, class: "title"}, title));
  const points = series.flatMap((s) => s.points);
  const xs = points.map(([x]) => x);
  const xMin = xLabels ? 0 : Math.min(...xs, 0);
  const xMax = xLabels ? Math.max(xLabels.length - 1, 1) : Math.max(...xs, xMin + 1);
  const top = niceMax(Math.max(yMax, ...points.map(([, y]) => y)));
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const sx = (x) => PAD.left + ((x - xMin) / (xMax - xMin || 1)) * plotWidth;
  const sy = (y) => PAD.top + plotHeight - (y / top) * plotHeight;

  for (let i = 0; i <= 4; i++) {
    const value = (top * i) / 4;
    svg.append(el("line", {x1: PAD.left, x2: WIDTH - PAD.right, y1: sy(value), y2: sy(value), class: "grid"}));
    svg.append(el("text", {x: PAD.left - 4, y: sy(value) + 3, "text-anchor": "end"}, yFormat(value)));
  }
  svg.append(el("line", {x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: PAD.top + plotHeight, class: "axis"}));
  const xTicks = xLabels ? xLabels.map((label, i) => [i, label])
    : [0, 1, 2, 3, 4].map((i) => xMin + ((xMax - xMin) * i) / 4).map((x) => [x, xFormat(x)]);
  for (const [x, label] of xTicks) {
    svg.append(el("text", {x: sx(x), y: HEIGHT - PAD.bottom + 14, "text-anchor": "middle"}, label));
  }

  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    if (s.points.length) {
      const d = s.points.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
      svg.append(el("path", {d, fill: "none", stroke: color, "stroke-width": 2, class: "series"}));
      if (s.points.length < 20) {
        for (const [x, y] of s.points) svg.append(el("circle", {cx: sx(x), cy: sy(y), r: 3, fill: color}));
      }
    }
    const legendX = PAD.left + i * 110;
    svg.append(el("rect", {x: legendX, y: HEIGHT - 12, width: 10, height: 3, fill: color}));
    svg.append(el("text", {x: legendX + 14, y: HEIGHT - 8}, s.name));
  });
  return svg;
}
