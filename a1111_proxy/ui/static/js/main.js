// The shell: routes (#/queue, #/jobs, #/jobs/<id>, #/new, #/models, #/backends, #/signin),
// the navigation, signing in and out.

import { ApiError, call, releaseImages, session, signIn, signOut, whoami } from "./api.js";
import { errorBox, field, h } from "./dom.js";

performance.mark("ui-start");

// Each page's module is loaded when it is first shown (the page preloads the jobs list's).
const ROUTES = [
  [/^\/queue$/, () => import("./queue.js"), "Queue", "queue"],
  [/^\/jobs$/, () => import("./jobs.js"), "Jobs", "jobs"],
  [/^\/jobs\/([^/]+)$/, () => import("./job.js"), "Job", "jobs"],
  [/^\/new$/, () => import("./newjob.js"), "New job", "new"],
  [/^\/models$/, () => import("./models.js"), "Models", "models"],
  [/^\/backends$/, () => import("./backends.js"), "Backends", "backends"],
  [/^\/signin$/, async () => ({ render: renderSignIn }), "Sign in", "signin"],
];
const HOME = "#/jobs";

const main = document.getElementById("main");
let leave = null; // the current page's cleanup
let first = true;

let routing = 0; // the latest route asked for: an older one still loading is dropped

async function route() {
  const asked = ++routing;
  const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
  const found = ROUTES.find(([pattern]) => pattern.test(path));
  if (!found) {
    location.replace(HOME);
    return;
  }
  const [pattern, load, title, nav] = found;
  const page = await load();
  if (asked !== routing) return;
  if (leave) leave();
  releaseImages();
  main.replaceChildren();
  document.title = `${title} · a1111-proxy`;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.nav === nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (nav !== "jobs") learnRole();
  const params = path.match(pattern).slice(1).map(decodeURIComponent);
  leave = page.render(main, { params, query: new URLSearchParams(search) }) || null;
  if (!first) main.focus({ preventScroll: true });
  first = false;
  window.scrollTo(0, 0);
}

window.addEventListener("hashchange", route);
window.addEventListener("unauthorized", () => {
  if (!location.hash.startsWith("#/signin")) {
    location.hash = `#/signin?next=${encodeURIComponent(location.hash || HOME)}`;
  }
});

document.getElementById("skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

document.getElementById("signout").addEventListener("click", () => {
  signOut();
  showWho();
  location.hash = "#/signin";
});

function showWho() {
  const who = document.getElementById("who");
  const out = document.getElementById("signout");
  out.hidden = !session.token;
  who.textContent = session.tokensOff ? "tokens off: admin"
    : !session.token ? "" : session.role ? `signed in: ${session.role}` : "";
}

// Learn the role in the background: pages that need it wait for session.ready. On the jobs
// list, not before its first page is painted: that answer comes first.
let learned;
session.ready = new Promise((resolve) => { learned = resolve; });
let learning = false;
function learnRole() {
  if (learning) return;
  learning = true;
  whoami().then(() => {
    session.tokensOff = !session.token && session.role === "admin";
  }).catch(() => {}).finally(() => {
    showWho();
    learned();
  });
}
window.addEventListener("jobs-painted", learnRole, { once: true });
setTimeout(learnRole, 1000);

// --- signing in ----------------------------------------------------------------------------

function renderSignIn(root, { query }) {
  const next = query.get("next") || HOME;
  const input = h("input", {
    type: "password", name: "token", autocomplete: "current-password", required: true,
    spellcheck: "false",
  });
  const message = h("div", { "aria-live": "polite" });
  const form = h("form", {
    class: "card narrow",
    async onsubmit(event) {
      event.preventDefault();
      message.replaceChildren();
      const token = input.value.trim();
      try {
        await call("/sdapi/v1/jobs?limit=1", { token });
      } catch (error) {
        const text = error instanceof ApiError && error.status === 401
          ? "That token was refused. Use one of the server's API_TOKENS or ADMIN_TOKENS."
          : error.message;
        message.replaceChildren(errorBox(new Error(text)));
        input.focus();
        return;
      }
      signIn(token);
      session.ready = whoami().then(showWho, showWho);
      await session.ready;
      location.hash = next;
    },
  },
  field("API token", input, "Kept in this browser tab only (sessionStorage), sent as a bearer token."),
  h("button", { type: "submit" }, "Sign in"),
  message);
  root.append(h("h1", { tabindex: "-1" }, "Sign in"), form);
  // With tokens off, say so: no token is needed.
  call("/sdapi/v1/jobs?limit=1", { token: null }).then(() => {
    message.replaceChildren(h("p", { class: "note" },
      "This server has tokens off: no token is needed (every caller is an admin). ",
      h("a", { href: next }, "Continue")));
  }).catch(() => {});
  input.focus();
}

route();
