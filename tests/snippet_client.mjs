// Runs Rapport's tracking snippet, as ingestion serves it, in Node with the
// few browser objects it uses (document, location, cookies, a form). Its
// requests go over real HTTP to ingestion.
//
// Usage: node snippet_client.mjs PUBLIC_URL WRITE_KEY RUN_ID
// Prints a JSON line with the anonymous id the snippet chose.

const [publicUrl, writeKey, run] = process.argv.slice(2);
const source = await (await fetch(`${publicUrl}/t.js`)).text();

let cookies = "";
const listeners = {};
const pending = [];
const realFetch = globalThis.fetch;
globalThis.fetch = (...args) => {
  const request = realFetch(...args).then(async (response) => {
    if (!response.ok) throw new Error(`${args[0]} answered ${response.status}: ${await response.text()}`);
    return response;
  });
  pending.push(request);
  return request;
};
globalThis.window = globalThis;
window.location = new URL(`https://www.acme.example/pricing?utm_source=newsletter&utm_campaign=spring-${run}`);
window.navigator = { userAgent: "snippet-test" };
globalThis.document = {
  title: "Pricing",
  referrer: "https://search.example/?q=acme",
  currentScript: { src: `${publicUrl}/t.js`, dataset: { writeKey } },
  get cookie() { return cookies; },
  set cookie(value) { cookies = value.split(";")[0]; },
  addEventListener(type, handler) { listeners[type] = handler; },
  createElement() { return {}; },
};

new Function(source)();
const anonymousId = window.rapport.anonymousId();
if (!cookies.startsWith("rapport_aid=")) throw new Error(`no first-party cookie: ${cookies}`);

await window.rapport.track("Plan Selected", { plan: "pro" });
const appended = [];
const form = {
  action: `${publicUrl}/f/some-form`,
  elements: { email: { value: `lead-${run}@example.com` } },
  appendChild(input) { appended.push(input); },
};
listeners.submit({ target: form });
if (appended.length !== 1 || appended[0].name !== "anonymous_id" || appended[0].value !== anonymousId) {
  throw new Error("the form did not get the anonymous id");
}
await Promise.all(pending);
console.log(JSON.stringify({ anonymousId }));
