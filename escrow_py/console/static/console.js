// Refreshes the operator console: the server renders the figures, this swaps them in and redraws the chart.
(function () {
  "use strict";
  var base = document.body.dataset.base;
  var query = document.body.dataset.query || "";
  var chart = null;

  function draw(series, xIsTime) {
    var data = [series.t || [], series.held || [], series.settled || []];
    if (chart === null) {
      var opts = {
        scales: { x: { time: xIsTime } },
        title: "Held value and settlements (atomic units)",
        width: Math.min(900, window.innerWidth - 40),
        height: 260,
        series: [{}, { label: "held", stroke: "#1f77b4" }, { label: "settled", stroke: "#2ca02c" }],
        axes: [{}, { size: 80 }],
      };
      chart = new uPlot(opts, data, document.getElementById("chart"));
    } else {
      chart.setData(data);
    }
  }

  function refresh() {
    fetch(base + "/fragment" + query)
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { document.getElementById("figures").innerHTML = html; })
      .then(function () { return fetch(base + "/data.json" + query); })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) {
        draw(data.series, data.seriesXIsTime !== false);
        document.getElementById("updated").textContent = new Date().toISOString();
      })
      .catch(function (status) { document.getElementById("updated").textContent = "refresh failed: " + status; });
  }

  refresh();
  setInterval(refresh, 2000);
})();
