// The stream page's live part: poll state.json; update progress in place, and when a version
// appears, changes status or gets metrics (the signature changes), swap in the server-rendered panel.
(function () {
  "use strict";
  var root = document.getElementById("stream");
  if (!root) return;
  var id = root.dataset.stream;
  var every = parseInt(root.dataset.poll, 10) || 1000;
  var base = "/ui/streams/" + encodeURIComponent(id);

  function updateRow(v) {
    var row = document.getElementById("v-" + v.number);
    if (!row) return false;
    var bar = row.querySelector("progress");
    if (bar) bar.value = v.progress;
    var pct = row.querySelector(".pct");
    if (pct) pct.textContent = Math.round(v.progress * 100) + "%";
    return row.dataset.status === v.status;
  }

  function redraw() {
    return fetch(base + "/panel", { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error("panel " + r.status);
      return r.text();
    }).then(function (html) {
      root.innerHTML = html;
    });
  }

  function tick() {
    fetch(base + "/state.json", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (r.status === 401) { window.location = "/ui/login"; throw new Error("logged out"); }
        if (!r.ok) throw new Error("state " + r.status);
        return r.json();
      })
      .then(function (state) {
        var same = state.signature === root.dataset.signature;
        state.versions.forEach(function (v) { same = updateRow(v) && same; });
        if (!same) {
          return redraw().then(function () { root.dataset.signature = state.signature; });
        }
      })
      .catch(function () { /* the server is away for a moment: try again on the next tick */ })
      .then(function () { window.setTimeout(tick, every); });
  }

  window.setTimeout(tick, every);
})();
