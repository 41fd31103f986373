// The shell: routes (#/queue, #/jobs, #/jobs/<id>, #/new, #/models, #/backends, #/signin),
// the navigation, signing in and out.

import { ApiError, call, releaseImages, session, signIn, signOut, whoami } from "./api.js";
import { errorBox, field, h } from "./dom.js";
import * as backends from "./backends.js";
import * as job from "./job.js";
import * as jobs from "./jobs.js";
import * as models from "./models.js";
import * as newJob from "./newjob.js";
import * as queue from "./queue.js";

performance.mark("ui-start");

const ROUTES = [
  [/^\/queue$/, queue.render, "Queue", "queue"],
  [/^\/jobs$/, jobs.render, "Jobs", "jobs"],
  [/^\/jobs\/([^/]+)$/, job.render, "Job", "jobs"],
  [/^\/new$/, newJob.render, "New job", "new"],
  [/^\/models$/, models.render, "Models", "models"],
  [/^\/backends$/, backends.render, "Backends", "backends"],
  [/^\/signin$/, renderSignIn, "Sign in", "signin"],
];
const HOME = "#/jobs";

const main = document.getElementById("main");
let leave = null; // the current page's cleanup
let first = true;

function route() {
  const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
  const found = ROUTES.find(([pattern]) => pattern.test(path));
  if (!found) {
    location.replace(HOME);
    return;
  }
  const [pattern, render, title, nav] = found;
  if (leave) leave();
  releaseImages();
  main.replaceChildren();
  document.title = `${title} · a1111-proxy`;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.nav === nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const params = path.match(pattern).slice(1).map(decodeURIComponent);
  leave = render(main, { params, query: new URLSearchParams(search) }) || null;
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

// Learn the role in the background: pages that need it wait for session.ready.
session.ready = whoami().then(() => {
  session.tokensOff = !session.token && session.role === "admin";
  showWho();
}).catch(() => showWho());

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
      session.ready = whoami().then(showWho);
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
