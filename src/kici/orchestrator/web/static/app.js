/* KiCI dashboard: progressive enhancement, no dependencies (see docs/operator/dashboard.md).
   Without this file every page still works; with it: local times, live runs list and job panel,
   the live log over server-sent events, and a confirmation before force-cancel. */
(function () {
  "use strict";
  var MAX_LOG_ROWS = 5000; // the live log keeps at most this many rows in the DOM; older ones are dropped

  function localTimes(root) {
    var items = (root || document).querySelectorAll("time[datetime]");
    for (var i = 0; i < items.length; i++) {
      var d = new Date(items[i].getAttribute("datetime"));
      if (!isNaN(d.getTime())) items[i].textContent = d.toLocaleString();
    }
  }

  function poll(el, every) {
    var url = el.getAttribute("data-live-url");
    var last = null;
    var timer = setInterval(function () {
      if (document.hidden) return;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null || html === last) return;
          last = html;
          el.innerHTML = html;
          localTimes(el);
          if (el.querySelector("[data-finished]")) {
            clearInterval(timer);
            // the run finished: reload once so the buttons and the log match its final state
            if (el.id === "jobs") window.location.reload();
          }
        })
        .catch(function () {});
    }, every);
  }

  function liveLog(log) {
    var source = new EventSource(log.getAttribute("data-stream-url"), { withCredentials: true });
    source.addEventListener("lines", function (event) {
      var nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      var empty = document.getElementById("log-empty");
      if (empty) empty.remove();
      log.insertAdjacentHTML("beforeend", event.data);
      var rows = log.children;
      if (rows.length > MAX_LOG_ROWS) {
        var drop = rows.length - MAX_LOG_ROWS;
        for (var i = 0; i < drop; i++) log.removeChild(log.firstElementChild);
        if (!log.querySelector(".trimmed")) {
          var note = document.createElement("div");
          note.className = "trimmed";
          note.textContent = "Earlier lines are on the previous pages (reload to page through them).";
          log.insertBefore(note, log.firstChild);
        }
      }
      if (nearBottom) log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("end", function () { source.close(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    var rows = document.querySelector("#runs-rows[data-live-url]");
    if (rows) poll(rows, 2000);
    var jobs = document.querySelector("#jobs[data-live-url]");
    if (jobs) poll(jobs, 1500);
    var log = document.querySelector("#log[data-stream-url]");
    if (log) liveLog(log);
    var confirmForms = document.querySelectorAll("form[data-confirm]");
    for (var i = 0; i < confirmForms.length; i++) {
      confirmForms[i].addEventListener("submit", function (e) {
        if (!window.confirm(this.getAttribute("data-confirm"))) e.preventDefault();
      });
    }
  });
})();
