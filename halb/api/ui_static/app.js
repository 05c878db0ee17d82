// halb status page: re-fetch the server-rendered part of the page about once a second.
// The node renders and escapes everything (halb/api/ui_render.py); this only swaps it in.
// No framework, no build step; the cookie goes along by itself (same origin, HttpOnly).
(function () {
  "use strict";
  var live = document.getElementById("live");
  var badge = document.getElementById("refresh");
  if (!live || !badge) { return; }
  var PERIOD_MS = 1000;
  var TIMEOUT_MS = 15000;
  var last = null;
  var elapsed = 0;  // how long the last answer took: a slow node (huge cluster) is asked less often

  function show(text, ok) {
    badge.textContent = text;
    badge.className = ok ? "ok" : "stale";
  }

  // at most ~20% of the node's time for this tab, however slow the page is to build
  function schedule() { window.setTimeout(tick, Math.max(PERIOD_MS, 4 * elapsed)); }

  function tick() {
    if (document.hidden) { schedule(); return; }  // a background tab costs the node nothing
    var ctrl = new AbortController();
    var timer = window.setTimeout(function () { ctrl.abort(); }, TIMEOUT_MS);
    var started = Date.now();
    fetch("/ui/live", { credentials: "same-origin", cache: "no-store", signal: ctrl.signal,
                        headers: { "Accept": "text/html" } })
      .then(function (resp) {
        if (resp.status === 401 || resp.status === 403) {  // revoked, expired or signed out elsewhere
          window.location.assign("/ui");
          return null;
        }
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        elapsed = Date.now() - started;
        return resp.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        if (html !== last) { live.innerHTML = html; last = html; }
        show("live", true);
        schedule();
      })
      .catch(function (err) {
        show("not updating: " + (err.name === "AbortError" ? "timeout" : err.message), false);
        schedule();
      })
      .finally(function () { window.clearTimeout(timer); });
  }

  last = live.innerHTML;
  schedule();
})();
