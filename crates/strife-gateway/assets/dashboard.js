// Strife's operator dashboard: live updates of the overview. Polls
// /api/overview every two seconds and draws the charts as inline SVG.
// Served from the binary (no library, no network beyond this gateway).
"use strict";
(function () {
  var POLL_MS = 2000;
  var SVG = "http://www.w3.org/2000/svg";

  function text(id, value) {
    var el = document.getElementById(id);
    if (el) { el.textContent = String(value); }
  }

  function line(svg, points, max, color) {
    var w = 600, h = 120, n = points.length;
    if (n < 2) { return; }
    var d = points.map(function (v, i) {
      var x = (i / (n - 1)) * w;
      var y = h - 4 - (max > 0 ? (v / max) * (h - 8) : 0);
      return (i === 0 ? "M" : "L") + x.toFixed(1) + " " + y.toFixed(1);
    }).join(" ");
    var path = document.createElementNS(SVG, "path");
    path.setAttribute("d", d);
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", color);
    path.setAttribute("stroke-width", "1.5");
    svg.appendChild(path);
  }

  function chart(id, series, label) {
    var svg = document.getElementById(id);
    if (!svg) { return; }
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var max = 0;
    series.forEach(function (s) { s.values.forEach(function (v) { if (v > max) { max = v; } }); });
    series.forEach(function (s) { line(svg, s.values, max, s.color); });
    var t = document.createElementNS(SVG, "text");
    t.setAttribute("x", "4");
    t.setAttribute("y", "14");
    t.setAttribute("font-size", "11");
    t.textContent = label + " (max " + (Math.round(max * 100) / 100) + ")";
    svg.appendChild(t);
  }

  function alarms(list) {
    var banner = document.getElementById("alarm-banner");
    if (!banner) { return; }
    while (banner.firstChild) { banner.removeChild(banner.firstChild); }
    banner.setAttribute("data-alarms", String(list.length));
    banner.className = list.length ? "alarm" : "ok";
    if (!list.length) {
      var p = document.createElement("p");
      p.textContent = "Nothing needs a person.";
      banner.appendChild(p);
      return;
    }
    var ul = document.createElement("ul");
    list.forEach(function (a) {
      var li = document.createElement("li");
      li.setAttribute("data-testid", "alarm");
      li.setAttribute("data-alarm", a.code);
      li.textContent = a.message;
      ul.appendChild(li);
    });
    banner.appendChild(ul);
  }

  function banks(list) {
    list.forEach(function (b) {
      var cells = document.querySelectorAll('td[data-testid="bank-health"]');
      for (var i = 0; i < cells.length; i++) {
        var row = cells[i].parentNode;
        if (cells[i].getAttribute("data-bank") === b.name && row.children[1].textContent === b.address) {
          var health = b.reachable ? "up" : "unreachable";
          cells[i].textContent = health;
          cells[i].className = health;
          row.children[3].textContent = b.last_seen_secs === null ? "never" : b.last_seen_secs.toFixed(1) + " s ago";
          row.children[4].textContent = b.in_doubt;
          row.children[5].textContent = b.in_doubt_oldest;
        }
      }
    });
  }

  function update(o) {
    text("count-committed", o.counts.committed);
    text("count-declined", o.counts.declined);
    text("count-preparing", o.counts.preparing);
    text("in-doubt-oldest", o.oldest_undecided_secs === null ? "none" : o.oldest_undecided_secs + " s");
    text("undelivered", o.undelivered);
    text("decision-conflicts", o.decision_conflicts);
    o.declines.forEach(function (d) { text("decline-" + d.reason, d.count); });
    alarms(o.alarms);
    banks(o.banks);
    var s = o.samples;
    chart("chart-rate", [
      { values: s.map(function (x) { return x.committed; }), color: "#1e7b34" },
      { values: s.map(function (x) { return x.declined; }), color: "#c0392b" }
    ], "payments/s");
    chart("chart-latency", [
      { values: s.map(function (x) { return x.p50_ms; }), color: "#2266cc" },
      { values: s.map(function (x) { return x.p99_ms; }), color: "#b35c00" }
    ], "latency ms");
    var last = s.length ? s[s.length - 1] : null;
    text("latency-now", last ? "last second: p50 " + last.p50_ms + " ms, p99 " + last.p99_ms + " ms" : "no data");
  }

  function poll() {
    fetch("/api/overview", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (o) { if (o) { update(o); } })
      .catch(function () {})
      .then(function () { setTimeout(poll, POLL_MS); });
  }

  if (document.getElementById("chart-rate")) { poll(); }
})();
