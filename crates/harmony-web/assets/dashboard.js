// Harmony dashboard: live fragments over server-sent events, and write buttons that post to
// the operator API (asking for the API token when the server needs one). Plain script, no
// build step; the page works without it, only without live updates and buttons.
(function () {
  "use strict";
  var TOKEN_KEY = "harmony-api-token";
  var main = document.getElementById("live");
  var status = document.getElementById("live-status");
  var flash = document.getElementById("flash");
  var tokenForm = document.getElementById("token-form");
  var tokenInput = document.getElementById("token-input");
  var pending = null;

  function say(text, bad) {
    flash.textContent = text;
    flash.className = bad ? "shown bad" : "shown";
  }

  // ---- live updates ----
  function swap(html) {
    // Keep keyboard focus on the same control across the swap.
    var focused = document.activeElement;
    var key = focused && main.contains(focused)
      ? (focused.id || focused.getAttribute("data-action")) : null;
    var open = [];
    main.querySelectorAll("details[open] summary").forEach(function (s) { open.push(s.textContent); });
    main.innerHTML = html;
    main.querySelectorAll("details summary").forEach(function (s) {
      if (open.indexOf(s.textContent) >= 0) { s.parentNode.open = true; }
    });
    if (key) {
      var again = document.getElementById(key) ||
        main.querySelector('[data-action="' + key.replace(/"/g, "") + '"]');
      if (again) { again.focus(); }
    }
  }

  // While a filter field has the focus, an update would wipe what is being typed: keep the
  // latest fragment and swap it in when the field is left.
  var deferred = null;
  function editing() {
    var a = document.activeElement;
    return a && main.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
  }
  main.addEventListener("focusout", function () {
    setTimeout(function () {
      if (deferred !== null && !editing()) { var html = deferred; deferred = null; swap(html); }
    }, 0);
  });

  if (main && main.dataset.view && window.EventSource) {
    var source = new EventSource("/events?view=" + encodeURIComponent(main.dataset.view));
    source.addEventListener("fragment", function (e) {
      if (editing()) { deferred = e.data; } else { swap(e.data); }
      status.textContent = "live";
      document.body.setAttribute("data-generation", e.lastEventId);
    });
    source.addEventListener("open", function () { status.textContent = "live"; });
    source.addEventListener("error", function () { status.textContent = "reconnecting…"; });
  }

  // ---- write actions ----
  function post(url, button) {
    var headers = { "Content-Type": "application/json" };
    var token = sessionStorage.getItem(TOKEN_KEY);
    if (token) { headers["Authorization"] = "Bearer " + token; }
    if (button) { button.disabled = true; }
    return fetch(url, { method: "POST", headers: headers, body: "{}" })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (body) {
          if (button) { button.disabled = false; }
          if (r.ok) {
            say("Done: " + (body.action || "action") + ".", false);
            return;
          }
          if (r.status === 401 || (r.status === 403 && body.kind === "forbidden")) {
            if (r.status === 403) { sessionStorage.removeItem(TOKEN_KEY); }
            askToken(url, button, r.status === 403);
            return;
          }
          say("Refused (" + r.status + "): " + (body.error || r.statusText), true);
        });
      })
      .catch(function (e) {
        if (button) { button.disabled = false; }
        say("Request failed: " + e, true);
      });
  }

  function askToken(url, button, wrong) {
    pending = { url: url, button: button };
    tokenForm.hidden = false;
    say(wrong ? "That token was refused; enter the API token." :
      "This action needs the server's API token.", true);
    tokenInput.value = "";
    tokenInput.focus();
  }

  tokenForm.addEventListener("submit", function (e) {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value);
    tokenForm.hidden = true;
    var p = pending;
    pending = null;
    if (p) { post(p.url, p.button); }
  });
  document.getElementById("token-cancel").addEventListener("click", function () {
    tokenForm.hidden = true;
    pending = null;
    say("Cancelled.", false);
  });

  document.addEventListener("click", function (e) {
    var button = e.target.closest ? e.target.closest("button[data-action]") : null;
    if (!button) { return; }
    e.preventDefault();
    var question = button.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { return; }
    post(button.getAttribute("data-action"), button);
  });
})();
