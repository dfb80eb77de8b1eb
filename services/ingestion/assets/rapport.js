/*! Rapport tracking snippet. Served by ingestion at /t.js.
 *
 * <script src="https://track.example.com/t.js" data-write-key="rwk_..." async></script>
 *
 * Records a page view on load (path, URL, referrer, title and UTM
 * parameters), keeps a first-party anonymous id in the `rapport_aid` cookie,
 * adds that id to Rapport-hosted forms on submit, and identifies the visitor
 * by the email field of any form they submit. `window.rapport` offers
 * page(), track(event, properties) and identify(userId, traits).
 */
(function () {
  "use strict";
  if (window.rapport && window.rapport.loaded) return;
  var script = document.currentScript || {};
  var dataset = script.dataset || {};
  var config = window.rapportConfig || {};
  var writeKey = config.writeKey || dataset.writeKey || "";
  var host = (config.host || (script.src ? new URL(script.src).origin : "")).replace(/\/$/, "");
  var COOKIE = "rapport_aid";
  var TWO_YEARS = 60 * 60 * 24 * 730;

  function uuid() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, function (c) {
      var r = (Math.random() * 16) | 0;
      return (c === "x" ? r : (r & 0x3) | 0x8).toString(16);
    });
  }

  function readCookie(name) {
    var parts = ("; " + (document.cookie || "")).split("; " + name + "=");
    return parts.length === 2 ? decodeURIComponent(parts.pop().split(";")[0]) : "";
  }

  var anonymousId = readCookie(COOKIE);
  if (!anonymousId) {
    anonymousId = uuid();
    document.cookie =
      COOKIE + "=" + encodeURIComponent(anonymousId) + "; path=/; max-age=" + TWO_YEARS + "; SameSite=Lax";
  }
  var userId = "";

  function campaign() {
    var params = new URLSearchParams(window.location.search || "");
    var out = {};
    [["utm_source", "source"], ["utm_medium", "medium"], ["utm_campaign", "name"], ["utm_term", "term"], ["utm_content", "content"]]
      .forEach(function (pair) {
        var value = params.get(pair[0]);
        if (value) out[pair[1]] = value;
      });
    return out;
  }

  function context() {
    return {
      page: {
        path: window.location.pathname,
        url: window.location.href,
        referrer: document.referrer || "",
        title: document.title || "",
        search: window.location.search || ""
      },
      campaign: campaign(),
      userAgent: (window.navigator && window.navigator.userAgent) || "",
      library: { name: "rapport.js", version: "1" }
    };
  }

  function send(path, body) {
    var now = new Date().toISOString();
    body.messageId = uuid();
    body.anonymousId = anonymousId;
    if (userId) body.userId = userId;
    body.timestamp = now;
    body.sentAt = now;
    body.context = context();
    return fetch(host + path, {
      method: "POST",
      keepalive: true,
      headers: { "Content-Type": "application/json", Authorization: "Basic " + btoa(writeKey + ":") },
      body: JSON.stringify(body)
    });
  }

  var api = {
    loaded: true,
    anonymousId: function () { return anonymousId; },
    page: function (name, properties) {
      var props = Object.assign(
        { path: window.location.pathname, url: window.location.href, referrer: document.referrer || "", title: document.title || "" },
        properties || {}
      );
      return send("/v1/page", { name: name || document.title || "", properties: props });
    },
    track: function (event, properties) {
      return send("/v1/track", { event: event, properties: properties || {} });
    },
    identify: function (id, traits) {
      if (id) userId = String(id);
      return send("/v1/identify", { traits: traits || {} });
    },
    onSubmit: function (form) {
      if (!form || !form.elements) return null;
      var action = form.action || "";
      if (action.indexOf(host + "/f/") === 0 && !form.elements.anonymous_id) {
        var input = document.createElement("input");
        input.type = "hidden";
        input.name = "anonymous_id";
        input.value = anonymousId;
        form.appendChild(input);
      }
      var email = form.elements.email && form.elements.email.value;
      if (email) return api.identify("", { email: email });
      return null;
    }
  };
  window.rapport = api;
  document.addEventListener("submit", function (event) { api.onSubmit(event.target); }, true);
  api.page();
})();
