// sdfleet's web page: plain JS, no libraries, nothing fetched but this API. Hash routes: #/ (form and jobs),
// #/gallery, #/job/<id>, #/fleet. The form's limits and defaults come from /openapi.json (JobCreate), the
// model's own defaults (steps, guidance, size) from /v1/models.
"use strict";

const KEY_STORE = "sdfleet.apiKey";
const FIELDS = ["prompt", "negative_prompt", "model", "width", "height", "steps", "guidance_scale", "seed",
                "num_images", "priority"];
const INT_FIELDS = new Set(["width", "height", "steps", "seed", "num_images"]);
const LIVE = new Set(["queued", "running"]);
const POLL_LIVE_MS = 500, POLL_IDLE_MS = 4000, POLL_FLEET_MS = 2000;
const MiB = 1024 ** 2, GiB = 1024 ** 3;

const state = {
  key: localStorage.getItem(KEY_STORE) || null,
  keyNeeded: false,
  schema: null,           // JobCreate's properties
  models: null,
  jobs: new Map(),        // id -> record, the caller's jobs as last listed
  jobsCursor: null,
  olderJobs: [],          // pages loaded with "Older jobs"
  gallery: [],
  galleryCursor: null,
  galleryMore: [],
  job: null,              // the job page's record
  memory: null,           // its timeline
  blobs: new Map(),       // image URL -> blob: URL (images need the key)
  previews: new Map(),    // job id -> {key, url, loading}: its latest preview, as a blob: URL
  timer: null,
  ticking: false,
  again: false,
};

const $ = (id) => document.getElementById(id);

// ---------- formatting ----------

function fmtSize(n) {  // like shared/memory.py fmt_size: binary units
  if (n === null || n === undefined) return "—";
  return n >= GiB / 10 ? `${(n / GiB).toFixed(1)} GiB` : `${(n / MiB).toFixed(0)} MiB`;
}

function fmtDur(s) {
  if (s === null || s === undefined || !isFinite(s)) return "—";
  if (s < 0) s = 0;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60), r = Math.floor(s % 60);
  if (m < 60) return `${m}m ${String(r).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

function parseTime(v) {
  if (!v) return null;
  return Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(v) ? v : v + "Z");
}

function fmtTime(v) {
  const t = parseTime(v);
  return t === null ? "—" : new Date(t).toLocaleString();
}

function ago(v) {
  const t = parseTime(v);
  return t === null ? "—" : `${fmtDur((Date.now() - t) / 1000)} ago`;
}

function bigNumber(n) {  // 4294967295 reads better as 2³²−1
  const k = Math.log2(n + 1);
  const sup = (x) => String(x).replace(/\d/g, (d) => "⁰¹²³⁴⁵⁶⁷⁸⁹"[d]);
  return n >= 65535 && Number.isInteger(k) ? `2${sup(k)}−1` : String(n);
}

function short(id) { return id ? id.slice(0, 8) : ""; }

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) e.append(c);
  return e;
}

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || (typeof body === "string" && body) || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.details = err.details ?? null;
  }
}

async function api(path, {method = "GET", json, key = state.key} = {}) {
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  let r;
  try {
    r = await fetch(path, {method, headers, body, cache: "no-store"});
  } catch (e) {
    throw new ApiError(0, {error: {code: "network", message: `the API did not answer (${e.message})`}});
  }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!r.ok) {
    const error = new ApiError(r.status, data);
    if (r.status === 401 && key === state.key) needKey(error.message);
    throw error;
  }
  if (state.keyNeeded && key === state.key) keyAccepted();
  return {status: r.status, data};
}

// Images need the same key as the record: fetched with it and shown through blob: URLs.
async function setImage(img, url) {
  if (img.dataset.src === url) return;
  img.dataset.src = url;
  if (!state.key) { img.src = url; return; }
  let blobUrl = state.blobs.get(url);
  if (!blobUrl) {
    const key = state.key;
    const r = await fetch(url, {headers: {Authorization: `Bearer ${key}`}});
    if (!r.ok || key !== state.key) return;
    blobUrl = URL.createObjectURL(await r.blob());
    state.blobs.set(url, blobUrl);
  }
  if (img.dataset.src === url) img.src = blobUrl;
}

function imageEl(url, alt, testid) {
  const img = el("img", {alt, "data-testid": testid, loading: "lazy"});
  setImage(img, url);
  return img;
}

// ---------- live previews ----------

// A running job's record names its latest preview (image, step): a small image of its latents, read from
// its URL (never cached, with the key) when the record names a newer one, shown through a blob: URL kept per
// job. Until the newer one has arrived, the last one stays.
function previewKey(p) { return `${p.image}/${p.step}`; }

function previewEl(j, testid, cls) {
  const p = j.preview;
  const img = el("img", {class: cls, "data-testid": testid, "data-preview-job": j.id, "data-image": p.image,
                         "data-step": p.step, alt: `preview: image ${p.image + 1}, step ${p.step} of ${p.steps}`,
                         title: `preview: image ${p.image + 1}, step ${p.step} of ${p.steps}`});
  const have = state.previews.get(j.id);
  if (have && have.url) { img.src = have.url; img.dataset.shown = have.key; }
  loadPreview(j);
  return img;
}

async function loadPreview(j) {
  const key = previewKey(j.preview);
  const have = state.previews.get(j.id) || {};
  if (have.key === key || have.loading === key) return;
  state.previews.set(j.id, Object.assign(have, {loading: key}));
  const sentKey = state.key;
  let blob = null, shown = key;
  try {
    const r = await fetch(j.preview.url, {headers: sentKey ? {Authorization: `Bearer ${sentKey}`} : {}, cache: "no-store"});
    if (r.ok) {  // the latest there is, perhaps newer than the record said: its headers say which
      blob = await r.blob();
      shown = `${r.headers.get("X-Preview-Image")}/${r.headers.get("X-Preview-Step")}`;
    }  // 404: it ended meanwhile (its images are the result)
  } catch { /* the next poll tries again */ }
  const now = state.previews.get(j.id);
  if (now !== have || sentKey !== state.key) { return; }
  have.loading = null;
  if (!blob) return;
  const old = have.url;
  have.url = URL.createObjectURL(blob);
  have.key = shown;
  for (const img of document.querySelectorAll(`img[data-preview-job="${j.id}"]`)) {
    img.src = have.url;
    img.dataset.shown = shown;
  }
  if (old) URL.revokeObjectURL(old);
}

function forgetPreviews(jobs) {  // jobs listed without a preview (ended): their blob goes
  for (const j of jobs) {
    const have = state.previews.get(j.id);
    if (!j.preview && have && !have.loading) {
      if (have.url) URL.revokeObjectURL(have.url);
      state.previews.delete(j.id);
    }
  }
}

// ---------- API keys ----------

function showKeyPanel(reason, isError) {
  $("key-panel").hidden = false;
  if (reason) $("key-reason").textContent = reason;
  $("key-error").hidden = !isError;
  if (isError) $("key-error").textContent = isError;
  $("key-forget").hidden = !state.key;
  setTimeout(() => $("key-input").focus(), 0);
}

function needKey(message) {
  if (state.keyNeeded) return;
  resetData();
  state.keyNeeded = true;
  if (state.key) showKeyPanel("The saved key was refused. Enter another one.", message);
  else showKeyPanel("This API asks for a key (Authorization: Bearer <key>). It is kept in this browser only.", null);
  renderKeyStatus();
  render();
}

function keyAccepted() {
  state.keyNeeded = false;
  $("key-panel").hidden = true;
  renderKeyStatus();
}

function renderKeyStatus() {
  const s = $("key-status");
  if (state.key) s.textContent = `key …${state.key.slice(-4)}`;
  else s.textContent = state.keyNeeded ? "key needed" : "no key";
  s.className = state.keyNeeded ? "warn" : "muted";
}

function resetData() {  // another key sees other jobs: nothing of the last one stays on the page
  for (const u of state.blobs.values()) URL.revokeObjectURL(u);
  state.blobs.clear();
  for (const p of state.previews.values()) if (p.url) URL.revokeObjectURL(p.url);
  state.previews.clear();
  state.jobs.clear();
  state.olderJobs = [];
  state.jobsCursor = null;
  state.gallery = [];
  state.galleryMore = [];
  state.galleryCursor = null;
  state.job = null;
  state.memory = null;
  state.models = null;
  $("job-rows").replaceChildren();
  $("gallery").replaceChildren();
  $("job-detail").replaceChildren();
}

async function useKey(candidate) {
  $("key-error").hidden = true;
  try {
    await api("v1/jobs?limit=1", {key: candidate});
  } catch (e) {
    $("key-error").hidden = false;
    $("key-error").textContent = e.status === 401 ? `Refused: ${e.message}` : `Could not check the key: ${e.message}`;
    return;
  }
  resetData();
  state.key = candidate;
  localStorage.setItem(KEY_STORE, candidate);
  $("key-input").value = "";
  keyAccepted();
  if (!state.schema) await loadSchema();
  await loadModels();
  kick();
}

// ---------- the submit form ----------

function fieldSchema(p) {  // Optional fields are anyOf [{...}, {type: null}]
  if (p && p.anyOf) return Object.assign({}, p.anyOf.find((x) => x.type !== "null") || {}, {default: p.default});
  return p || {};
}

// The schema needs the key where every route does (SDFLEET_AUTH): a 401 opens the key panel, and the schema
// is read again once a key is accepted (useKey).
async function loadSchema() {
  try {
    const {data} = await api("openapi.json");
    const props = data.components.schemas.JobCreate.properties;
    state.schema = props;
    initForm(props);
  } catch (e) {
    if (e.status !== 401) showSubmitError(`Could not read the API's schema: ${e.message}`);
  }
}

function initForm(props) {
  for (const name of FIELDS) {
    const p = fieldSchema(props[name]);
    const input = $(`f-${name}`);
    if (!input || !props[name]) continue;
    if (name === "priority") {
      input.replaceChildren(...(p.enum || []).map((v) => el("option", {value: v, text: v})));
    }
    if (p.minimum !== undefined) input.min = p.minimum;
    if (p.maximum !== undefined) input.max = p.maximum;
    if (p.maxLength !== undefined && input.tagName !== "SELECT") input.maxLength = p.maxLength;
    if (p.default !== undefined && p.default !== null && name !== "model") input.value = p.default;
    if (name === "model") input.addEventListener("change", showModelDefaults);
    const limit = document.querySelector(`[data-limit="${name}"]`);
    if (limit) {
      let text = "";
      if (p.minimum !== undefined && p.maximum !== undefined) text = `${p.minimum}–${bigNumber(p.maximum)}`;
      else if (p.maxLength !== undefined) text = `≤ ${p.maxLength} chars`;
      limit.textContent = text;
    }
  }
  $("submit-button").disabled = false;
}

async function loadModels() {
  try {
    const {data} = await api("v1/models");
    state.models = data;
  } catch (e) {
    if (e.status !== 401) showBanner(`Could not list models: ${e.message}`);
    return;
  }
  const select = $("f-model");
  const current = select.value;
  const names = state.models.map((m) => m.name);
  select.replaceChildren(...names.map((n) => el("option", {value: n, text: n})));
  if (!names.length) select.append(el("option", {value: "", text: "(no model served)"}));
  if (current && !names.includes(current)) select.append(el("option", {value: current, text: current}));
  if (current) select.value = current;
  showModelDefaults();
}

// Steps, guidance and size left empty take the model's own defaults, which its workers announce
// (/v1/models: an LCM 4 steps at guidance 8, a turbo model 1 step without guidance): shown as placeholders.
const DEFAULTED = ["width", "height", "steps", "guidance_scale"];

function showModelDefaults() {
  const model = (state.models || []).find((m) => m.name === $("f-model").value);
  const d = model && model.defaults;
  for (const name of DEFAULTED) $(`f-${name}`).placeholder = d ? `${d[name]} (model's)` : "model's default";
  const negative = $("f-negative_prompt");
  const refused = !!d && !d.negative_prompt;
  negative.disabled = refused;
  negative.placeholder = refused ? `${d.family}: takes no negative prompt (its guidance is an embedding)` : "optional";
  const note = $("model-defaults");
  note.textContent = !d ? "" : `${d.family} · ${d.pipeline} · ${d.scheduler} · made for ` +
    `${d.recommended_steps[0]}–${d.recommended_steps[1]} steps` +
    (d.guidance_doubles_batch ? "" : " · guidance is an embedding (no second UNet pass)") +
    (d.overridden.length ? ` · set by its operator: ${d.overridden.join(", ")}` : "");
}

function formBody() {
  const body = {};
  for (const name of FIELDS) {
    const raw = $(`f-${name}`).value;
    if (name === "prompt") { body.prompt = raw; continue; }
    if (raw === "" || raw === null) continue;
    if (name === "negative_prompt" || name === "model" || name === "priority") body[name] = raw;
    else body[name] = INT_FIELDS.has(name) && /^-?\d+$/.test(raw.trim()) ? parseInt(raw, 10) : Number(raw);
  }
  return body;
}

function applyChange(change) {
  for (const [name, value] of Object.entries(change)) {
    const input = $(`f-${name}`);
    if (!input) continue;
    if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === String(value))) {
      input.append(el("option", {value: String(value), text: String(value)}));
    }
    input.value = value === null ? "" : String(value);
    flash(input);
  }
}

function flash(input) {
  input.classList.remove("changed");
  void input.offsetWidth;
  input.classList.add("changed");
}

function clearSubmitError() {
  $("submit-error").hidden = true;
  $("hints").replaceChildren();
  for (const f of document.querySelectorAll("#submit-form .invalid")) f.classList.remove("invalid");
  for (const f of document.querySelectorAll("#submit-form .field-error")) f.remove();
}

const REFUSAL_TITLES = {insufficient_memory: "Not admitted: no worker has the memory for this job",
  invalid_request: "The API refused these parameters", model_unavailable: "No live worker serves this model",
  rate_limited: "Too many submissions", unauthorized: "An API key is needed"};

function showSubmitError(message, code) {
  $("submit-error").hidden = false;
  $("submit-error").dataset.code = code || "";
  $("submit-error-title").textContent = REFUSAL_TITLES[code] || (code ? `Refused (${code})` : "Error");
  $("submit-error-message").textContent = message;
}

async function submitJob(ev) {
  if (ev) ev.preventDefault();
  clearSubmitError();
  $("submit-ok").hidden = true;
  const button = $("submit-button");
  button.disabled = true;
  try {
    const {data} = await api("v1/jobs", {method: "POST", json: formBody()});
    state.jobs.set(data.id, data);
    const ok = $("submit-ok");
    ok.replaceChildren("Queued ", el("a", {href: `#/job/${data.id}`, text: short(data.id)}));
    ok.hidden = false;
    renderJobs();
    kick();
  } catch (e) {
    showRefusal(e);
  } finally {
    button.disabled = false;
  }
}

function showRefusal(e) {
  if (e.status === 401) { showSubmitError(`${e.message}: enter an API key.`, e.code); return; }
  showSubmitError(e.message, e.code);
  if (e.code === "invalid_request" && Array.isArray(e.details)) {
    for (const d of e.details) {
      const input = $(`f-${d.field}`);
      if (!input) continue;
      input.classList.add("invalid");
      input.closest("label").append(el("span", {class: "field-error", text: d.reason}));
    }
  }
  if (e.code === "insufficient_memory" && e.details && Array.isArray(e.details.hints)) {
    const hints = e.details.hints;
    const fits = hints.filter((h) => h.fits), not = hints.filter((h) => !h.fits);
    const box = $("hints");
    if (fits.length) {
      box.append(el("p", {class: "hint-title", text: "Would fit: submit again with"}));
      box.append(el("div", {class: "hint-buttons"}, fits.map((h) => el("button", {
        type: "button", class: "hint", "data-testid": "hint", "data-change": JSON.stringify(h.change),
        title: `predicted ${fmtSize(h.predicted_bytes)}`,
        onclick: () => { applyChange(h.change); submitJob(); },
      }, h.message))));
    }
    if (not.length) {
      box.append(el("details", {class: "nofit"}, el("summary", {text: `${not.length} change(s) that would still not fit`}),
        el("ul", {}, not.map((h) => el("li", {text: h.message})))));
    }
  }
  if (e.code === "model_unavailable" && e.details && e.details.served_models) {
    $("hints").append(el("p", {class: "muted", text: `served models: ${e.details.served_models.join(", ") || "none"}`}));
  }
}

// ---------- the caller's jobs ----------

async function refreshJobs() {
  const {data} = await api("v1/jobs?limit=50");
  const fresh = new Map(data.jobs.map((j) => [j.id, j]));
  // a job submitted a moment ago and not yet listed stays until the list has it
  for (const [id, j] of state.jobs) if (!fresh.has(id) && LIVE.has(j.status) && Date.now() - parseTime(j.created_at) < 5000) fresh.set(id, j);
  state.jobs = new Map([...fresh.entries()].sort((a, b) => parseTime(b[1].created_at) - parseTime(a[1].created_at)));
  state.jobsCursor = data.next_cursor;
  renderJobs();
}

async function moreJobs() {
  if (!state.jobsCursor) return;
  const {data} = await api(`v1/jobs?limit=50&cursor=${encodeURIComponent(state.jobsCursor)}`);
  state.olderJobs.push(...data.jobs);
  state.jobsCursor = data.next_cursor;
  renderJobs();
}

function progressText(p) {
  return `image ${p.image + 1} of ${p.images} · step ${p.step} of ${p.steps}`;
}

function progressFraction(p) {
  return Math.min(1, (p.image * p.steps + p.step) / Math.max(1, p.images * p.steps));
}

// A queued job's expected start (seconds from when the record was read) and why no worker is taking it.
function startText(j) {
  if (j.expected_start_s === null || j.expected_start_s === undefined) return "start unknown";
  return j.expected_start_s < 0.5 ? "starting now" : `starts in ~${fmtDur(j.expected_start_s)}`;
}

function statusCell(j) {
  const parts = [el("span", {class: `badge ${j.status}`, "data-testid": "status", text: j.status})];
  if (j.status === "queued" && j.queue_position) {
    parts.push(el("span", {class: "qpos", "data-testid": "queue-position", text: `#${j.queue_position} in queue`}));
  }
  if (j.status === "queued") {
    parts.push(el("div", {class: "small", "data-testid": "expected-start", text: startText(j)}));
    if (j.waiting_reason) parts.push(el("div", {class: "small muted waiting", "data-testid": "waiting-reason", text: j.waiting_reason}));
  }
  if (j.cancel_requested && LIVE.has(j.status)) parts.push(el("span", {class: "muted small", text: "cancelling…"}));
  if (j.status === "running") {
    if (j.progress) {
      parts.push(el("div", {class: "progress", "data-testid": "progress"},
        el("div", {class: "bar"}, el("span", {style: `width:${(progressFraction(j.progress) * 100).toFixed(1)}%`})),
        el("span", {class: "small", text: progressText(j.progress)})));
    } else {
      parts.push(el("div", {class: "small muted", text: "starting…"}));
    }
  }
  if (j.status === "failed" && j.error) parts.push(el("div", {class: "small error", title: j.error.message, text: j.error.code}));
  return parts;
}

function waitSeconds(j) {
  if (j.status === "queued") return (Date.now() - parseTime(j.created_at)) / 1000;
  return j.queue_wait_s;
}

function elapsedSeconds(j) {
  if (j.status === "running" && j.started_at) return (Date.now() - parseTime(j.started_at)) / 1000;
  if (j.started_at && j.finished_at) return (parseTime(j.finished_at) - parseTime(j.started_at)) / 1000;
  return null;
}

function cancelButton(j) {
  if (!LIVE.has(j.status) || j.cancel_requested) return null;
  return el("button", {type: "button", class: "small danger", "data-testid": "cancel", text: "Cancel",
                       onclick: (ev) => cancelJob(j.id, ev.currentTarget)});
}

async function cancelJob(id, button) {
  if (button) button.disabled = true;
  try {
    const {data} = await api(`v1/jobs/${id}`, {method: "DELETE"});
    if (state.jobs.has(id)) state.jobs.set(id, data);
    if (state.job && state.job.id === id) state.job = data;
  } catch (e) {
    showBanner(e.status === 409 ? `Job ${short(id)} had already finished.` : `Cancel failed: ${e.message}`);
  }
  render();
  kick();
}

function jobRow(j) {
  const p = j.parameters;
  const meta = `${p.model} · ${p.width}×${p.height} · ${p.steps} steps · ${p.num_images} img` +
    (j.priority !== "normal" ? ` · ${j.priority} priority` : "") + (j.fitted ? " · fitted" : "");
  return el("tr", {"data-testid": "job-row", "data-job-id": j.id, "data-status": j.status},
    el("td", {class: "jobcell"},
      j.preview ? el("a", {href: `#/job/${j.id}`, class: "thumb"}, previewEl(j, "preview-thumb", "preview-thumb")) : null,
      el("a", {href: `#/job/${j.id}`, class: "prompt", title: p.prompt, text: p.prompt}),
      el("div", {class: "small muted"}, el("code", {text: short(j.id)}), ` · ${meta}`)),
    el("td", {}, statusCell(j)),
    el("td", {class: "num", "data-testid": "wait", text: fmtDur(waitSeconds(j))}),
    el("td", {class: "num"}, el("span", {"data-testid": "elapsed", text: fmtDur(elapsedSeconds(j))}),
      j.predicted_generation_s !== null && j.predicted_generation_s !== undefined && j.status !== "failed" && j.status !== "cancelled"
        ? el("div", {class: "small muted", "data-testid": "predicted", title: "predicted generation time",
                     text: `~${fmtDur(j.predicted_generation_s)} predicted`}) : null),
    el("td", {class: "num"}, cancelButton(j)));
}

function renderJobs() {
  const tbody = $("job-rows");
  const jobs = [...state.jobs.values(), ...state.olderJobs.filter((j) => !state.jobs.has(j.id))];
  const rows = new Map([...tbody.children].map((tr) => [tr.dataset.jobId, tr]));
  let prev = null;
  for (const j of jobs) {
    const fresh = jobRow(j);
    let tr = rows.get(j.id);
    if (tr && tr.cells.length === fresh.cells.length) {
      // update changed cells only: a button being clicked stays the same element
      [...fresh.cells].forEach((td, n) => { if (tr.cells[n].innerHTML !== td.innerHTML) tr.cells[n].replaceWith(td); });
      tr.dataset.status = j.status;
    } else if (tr) {
      tr.replaceWith(fresh);
      tr = fresh;
    } else {
      tr = fresh;
    }
    rows.delete(j.id);
    if (prev ? prev.nextSibling !== tr : tbody.firstChild !== tr) {
      if (prev) prev.after(tr); else tbody.prepend(tr);
    }
    prev = tr;
  }
  for (const tr of rows.values()) tr.remove();
  forgetPreviews(jobs);
  const live = jobs.filter((j) => LIVE.has(j.status));
  $("jobs-summary").textContent = jobs.length ? `${live.filter((j) => j.status === "running").length} running · ` +
    `${live.filter((j) => j.status === "queued").length} queued · ${jobs.length} shown` : "";
  $("jobs-empty").hidden = jobs.length > 0 || state.keyNeeded;
  $("job-list").hidden = jobs.length === 0;
  $("jobs-more").hidden = !state.jobsCursor;
}

// ---------- gallery ----------

async function refreshGallery() {
  const {data} = await api("v1/jobs?status=succeeded&limit=24");
  state.gallery = data.jobs;
  if (!state.galleryMore.length) state.galleryCursor = data.next_cursor;
  renderGallery();
}

async function moreGallery() {
  if (!state.galleryCursor) return;
  const {data} = await api(`v1/jobs?status=succeeded&limit=24&cursor=${encodeURIComponent(state.galleryCursor)}`);
  state.galleryMore.push(...data.jobs);
  state.galleryCursor = data.next_cursor;
  renderGallery();
}

function renderGallery() {
  const box = $("gallery");
  const seen = new Set();
  const jobs = [...state.gallery, ...state.galleryMore].filter((j) => !seen.has(j.id) && seen.add(j.id));
  const items = [];
  for (const j of jobs) for (const im of j.images) items.push([j, im]);
  const existing = new Map([...box.children].map((f) => [f.dataset.key, f]));
  const order = items.map(([j, im]) => {
    const key = `${j.id}/${im.index}`;
    let fig = existing.get(key);
    if (!fig) {
      fig = el("figure", {class: "tile", "data-testid": "gallery-item", "data-job-id": j.id, "data-index": im.index, "data-key": key},
        el("a", {href: `#/job/${j.id}`, title: j.parameters.prompt},
          imageEl(im.url, j.parameters.prompt, "gallery-image")),
        el("figcaption", {},
          el("span", {class: "prompt", text: j.parameters.prompt}),
          el("span", {class: "small muted", text: `${im.width}×${im.height} · seed ${im.seed}`})));
    }
    existing.delete(key);
    return fig;
  });
  for (const f of existing.values()) f.remove();
  order.forEach((fig, i) => { if (box.children[i] !== fig) box.insertBefore(fig, box.children[i] || null); });
  $("gallery-summary").textContent = items.length ? `${items.length} image(s)` : "";
  $("gallery-empty").hidden = items.length > 0 || state.keyNeeded;
  $("gallery-more").hidden = !state.galleryCursor;
}

// ---------- a job's page ----------

async function refreshJob(id) {
  let job;
  try {
    ({data: job} = await api(`v1/jobs/${id}`));
  } catch (e) {
    if (e.status === 401) return;
    state.job = null;
    $("job-detail").replaceChildren(el("div", {class: "card"}, el("h2", {text: `Job ${short(id)}`}),
      el("p", {class: "error", "data-testid": "job-error", text: e.message})));
    $("memory-card").hidden = true;
    return;
  }
  if (currentRoute().id !== id) return;
  state.job = job;
  const memo = state.memory;
  // the timeline: once the job has ended (again if it ended since), every few seconds while it runs
  const need = !memo || memo.job_id !== id || memo.final !== job.status ||
    (LIVE.has(job.status) && Date.now() - memo.read > 3000);
  if (need && (job.started_at || !LIVE.has(job.status))) {
    try {
      const {data} = await api(`v1/jobs/${id}/memory`);
      state.memory = Object.assign(data, {final: LIVE.has(job.status) ? null : job.status, read: Date.now()});
    } catch (e) {
      state.memory = {job_id: id, missing: e.status === 404 ? e.message : `could not read it: ${e.message}`,
                      final: LIVE.has(job.status) ? null : job.status, read: Date.now()};
    }
  }
  renderJob();
}

function dl(pairs) {
  return el("dl", {class: "kv"}, pairs.filter(Boolean).map(([k, v, testid]) => [
    el("dt", {text: k}), el("dd", {"data-testid": testid || null}, v === null || v === undefined || v === "" ? "—" : v)]));
}

const KIND_NAMES = {txt2img: "text to image", img2img: "image to image", inpaint: "inpainting", upscale: "upscale"};

function renderJob() {
  const j = state.job;
  if (!j) return;
  const p = j.parameters;
  const head = el("div", {class: "card job-head"},
    el("div", {class: "card-head"},
      el("h2", {}, "Job ", el("code", {text: j.id})),
      el("span", {}, statusCell(j))),
    el("p", {class: "prompt-full", "data-testid": "job-prompt", text: p.prompt}),
    j.status === "queued" ? el("p", {class: "waiting-box", "data-testid": "job-waiting"},
      el("b", {text: startText(j)}), j.waiting_reason ? ` — ${j.waiting_reason}` : "") : null,
    j.fitted ? el("p", {class: "waiting-box", "data-testid": "job-fitted", title: j.fitted.reason},
      el("b", {text: `Fitted: ${fittedChanges(j.fitted)}`}),
      ` — no live worker fits it as asked (fit: auto took ${j.fitted.hint})`) : null,
    j.error ? el("p", {class: "error-box", "data-testid": "job-failure"}, el("b", {text: j.error.code}), `: ${j.error.message}`) : null,
    el("div", {class: "actions"},
      cancelButton(j),
      el("button", {type: "button", class: "ghost", "data-testid": "reuse", text: "Use these parameters",
                    onclick: () => { reuse(p); location.hash = "#/"; }})));
  const ratio = j.peak_rss_bytes && j.predicted_peak_bytes ? ` (${Math.round(100 * j.peak_rss_bytes / j.predicted_peak_bytes)}% of the prediction)` : "";
  const grids = el("div", {class: "cols3"},
    el("div", {class: "card"}, el("h3", {text: "Parameters"}), dl([
      ["Model", p.model], ["Kind", KIND_NAMES[p.kind] || p.kind, "job-kind"],
      p.strength !== null && p.strength !== undefined ? ["Strength", p.strength] : null,
      p.upscale ? ["Upscale", `${p.upscale}× in tiles of ${p.tile}×${p.tile}`] : null,
      ["Size", `${p.width}×${p.height}`], ["Steps", p.steps], ["Guidance", p.guidance_scale],
      ["Seed", p.seed], ["Images", p.num_images], ["Priority", j.priority],
      ["Negative prompt", p.negative_prompt]])),
    el("div", {class: "card"}, el("h3", {text: "Run"}), dl([
      ["Created", fmtTime(j.created_at)], ["Started", fmtTime(j.started_at)], ["Finished", fmtTime(j.finished_at)],
      ["Queue wait", fmtDur(waitSeconds(j)), "job-wait"], ["Elapsed", fmtDur(elapsedSeconds(j)), "job-elapsed"],
      ["Generation", fmtDur(j.generation_s)],
      ["Predicted generation", predictedText(j), "job-predicted-time"],
      ["Worker", j.worker_host], ["Attempts", j.attempts],
      j.status === "queued" ? ["Queue position", j.queue_position] : null,
      j.status === "queued" ? ["Expected start", startText(j), "job-expected-start"] : null,
      j.status === "queued" ? ["Waiting", j.waiting_reason, "job-waiting-reason"] : null,
      j.progress ? ["Progress", progressText(j.progress)] : null])),
    el("div", {class: "card"}, el("h3", {text: "Memory"}), dl([
      ["Predicted peak", `${fmtSize(j.predicted_peak_bytes)}${j.prediction_source ? ` (${j.prediction_source})` : ""}`, "job-predicted"],
      ["Measured peak", j.peak_rss_bytes ? `${fmtSize(j.peak_rss_bytes)}${ratio}` : null, "job-peak"],
      ["· anonymous", fmtSize(j.peak_rss_anon_bytes)], ["· file-backed", fmtSize(j.peak_rss_file_bytes)],
      ["RSS at start", fmtSize(j.rss_before_bytes)], ["Method", j.peak_rss_method],
      ["Memory class", fmtSize(j.memory_class_bytes)], ["Hand-ons", j.handoffs]])));
  // while it denoises: its latest preview, refreshed as the record names a newer one
  const pv = j.preview;
  const preview = pv ? el("div", {class: "card", "data-testid": "job-preview-card"}, el("h3", {text: "Preview"}),
    el("figure", {class: "preview"}, previewEl(j, "job-preview", "preview-large"),
      el("figcaption", {class: "small muted", "data-testid": "job-preview-caption",
        text: `image ${pv.image + 1} of ${p.num_images} · step ${pv.step} of ${pv.steps} · its latents ` +
              `(${pv.width}×${pv.height}) projected to colour, not decoded`}))) : null;
  if (!pv) forgetPreviews([j]);
  const images = j.images.length ? el("div", {class: "card"}, el("h3", {text: "Images"}),
    el("div", {class: "gallery", "data-job-id": j.id}, j.images.map((im) => el("figure", {class: "tile", "data-testid": "job-image-item"},
      imageEl(im.url, `image ${im.index}`, "job-image"),
      el("figcaption", {}, el("span", {class: "small muted", text: `#${im.index} · ${im.width}×${im.height} · seed ${im.seed}`})))))) : null;
  // what it was given (init image, mask), as the API stored them
  const given = (j.inputs || []).length ? el("div", {class: "card"}, el("h3", {text: "Given"}),
    el("div", {class: "gallery"}, j.inputs.map((i) => el("figure", {class: "tile", "data-testid": "job-input-item"},
      imageEl(i.url, i.role, "job-input"),
      el("figcaption", {}, el("span", {class: "small muted", text: `${i.role} · ${i.width}×${i.height} · ${i.source_format}`})))))) : null;
  // the job's history: attempts taken or handed back, and how each later one started from the checkpoint
  const events = [
    ...(j.history || []).map((h) => ({attempt: h.attempt, order: 0, testid: "history-attempt", text:
      `attempt ${h.attempt} on ${h.worker_host || "?"}: ${h.error.code} — ${h.error.message} (last reading ${fmtSize(h.peak_rss_bytes)})`})),
    ...(j.resumes || []).map((r) => ({attempt: r.attempt, order: 1, testid: "history-resume",
      text: `attempt ${r.attempt}: ${r.note}`})),
  ].sort((a, b) => a.attempt - b.attempt || a.order - b.order);
  const history = events.length ? el("div", {class: "card"}, el("h3", {text: "History"}),
    el("ul", {}, events.map((e) => el("li", {"data-testid": e.testid, text: e.text})))) : null;
  // keep the image elements of this job (no flicker, no refetch while polling)
  const box = $("job-detail");
  const old = box.querySelector(`.gallery[data-job-id="${j.id}"]`);
  box.replaceChildren(head, ...(preview ? [preview] : []), grids, ...(given ? [given] : []), ...(images ? [images] : []),
                      ...(history ? [history] : []));
  if (old && images && old.childElementCount === j.images.length) images.querySelector(".gallery").replaceWith(old);
  renderMemory();
}

// `fit: auto`: what admission changed so the job fits, e.g. "width 2048 → 768, height 2048 → 768"
function fittedChanges(f) {
  return Object.entries(f.changes).map(([k, v]) => `${k} ${f.original[k]} → ${v}`).join(", ");
}

function predictedText(j) {
  const s = j.predicted_generation_s;
  if (s === null || s === undefined) return "no measurement yet";
  const measured = j.status === "succeeded" && j.generation_s ?
    ` — measured ${fmtDur(j.generation_s)}, ${Math.round(100 * j.generation_s / s)}% of it` : "";
  return `${fmtDur(s)}${measured}`;
}

function reuse(p) {
  applyChange({prompt: p.prompt, negative_prompt: p.negative_prompt ?? "", model: p.model, width: p.width,
               height: p.height, steps: p.steps, guidance_scale: p.guidance_scale, seed: p.seed,
               num_images: p.num_images});
}

function renderMemory() {
  const m = state.memory, j = state.job;
  const card = $("memory-card");
  if (!j || !m || m.job_id !== j.id) { card.hidden = !j; $("memory-empty").hidden = false;
    $("memory-empty").textContent = j && LIVE.has(j.status) ? "The timeline appears once the job has run." : "";
    $("memory-plot").replaceChildren(); $("memory-legend").replaceChildren(); $("memory-summary").textContent = ""; return; }
  card.hidden = false;
  if (m.missing || !m.samples || !m.samples.length) {
    $("memory-empty").hidden = false;
    $("memory-empty").textContent = m.missing ? `No timeline: ${m.missing}` : "The timeline has no samples.";
    $("memory-plot").replaceChildren();
    $("memory-plot").removeAttribute("data-samples");
    $("memory-legend").replaceChildren();
    $("memory-summary").textContent = "";
    return;
  }
  $("memory-empty").hidden = true;
  drawPlot($("memory-plot"), m, j);
}

// ---------- the memory plot (inline SVG) ----------

const SVGNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function niceStep(range, count) {
  const raw = range / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag;
}

function byteStep(vmax, count) {  // tick steps in sizes a reader can add up: 50 MiB, 100 MiB, 256 MiB, 1 GiB ...
  const raw = vmax / count;
  const candidates = [1, 2, 5, 10, 20, 25, 50, 100, 128, 200, 256, 512].map((x) => x * MiB)
    .concat([1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 256].map((x) => x * GiB));
  return candidates.find((c) => c >= raw) || candidates[candidates.length - 1];
}

const PHASE_COLORS = {encode: "#3b7ddd", encode_image: "#8a5cd1", denoise: "#2fa36b", decode: "#d9468f"};

function drawPlot(el_, m, j) {
  const W = 880, H = 320, L = 70, R = 150, T = 22, B = 38;
  const x0 = L, x1 = W - R, y0 = H - B, y1 = T;
  const s = m.samples;
  const tmax = Math.max(...s.map((p) => p.t), 1e-3);
  const dataMax = Math.max(...s.map((p) => p.rss));
  const peak = m.peak_rss_bytes ?? j.peak_rss_bytes;
  const predicted = m.predicted_peak_bytes ?? j.predicted_peak_bytes;
  const budget = m.worker_budget_bytes ?? null;
  let top = Math.max(dataMax, peak || 0, predicted || 0);
  const budgetOnScale = budget !== null && budget <= top * 1.6;
  if (budgetOnScale) top = Math.max(top, budget);
  const ystep = byteStep(top * 1.08, 5);
  const vmax = Math.ceil(top * 1.08 / ystep) * ystep;
  const X = (t) => x0 + (t / tmax) * (x1 - x0);
  const Y = (v) => y0 - (v / vmax) * (y0 - y1);
  const f = (n) => n.toFixed(2);

  el_.replaceChildren();
  el_.setAttribute("viewBox", `0 0 ${W} ${H}`);
  Object.assign(el_.dataset, {x0, x1, y0, y1, tmax, vmax, samples: s.length, jobId: j.id});

  // phase bands: runs of samples in the same phase of the same image
  const bands = svg("g", {class: "bands"});
  let i = 0;
  const images = Math.max(1, ...s.map((p) => p.image + 1));
  while (i < s.length) {
    let k = i;
    while (k + 1 < s.length && s[k + 1].phase === s[i].phase && s[k + 1].image === s[i].image) k++;
    const phase = s[i].phase;
    if (PHASE_COLORS[phase]) {
      const ta = s[i].t, tb = k + 1 < s.length ? s[k + 1].t : s[k].t;
      const xa = X(ta), xb = Math.max(X(tb), xa + 1);
      bands.append(svg("rect", {x: f(xa), y: y1, width: f(xb - xa), height: y0 - y1, fill: PHASE_COLORS[phase],
                                "fill-opacity": 0.13, "data-phase": phase, "data-image": s[i].image},
                       undefined));
      bands.lastChild.append(svg("title", {}, `${phase}${images > 1 ? ` (image ${s[i].image + 1})` : ""}: ${ta.toFixed(2)}–${tb.toFixed(2)} s`));
      const label = images > 1 ? `${phase} ${s[i].image + 1}` : phase;
      if (xb - xa > label.length * 6.5 + 6) {
        bands.append(svg("text", {x: f((xa + xb) / 2), y: y1 - 6, "text-anchor": "middle", class: "phase-label",
                                  fill: PHASE_COLORS[phase]}, label));
      }
    }
    i = k + 1;
  }
  el_.append(bands);

  // axes and grid
  const grid = svg("g", {class: "grid"});
  for (let v = 0; v <= vmax + 1; v += ystep) {
    grid.append(svg("line", {x1: x0, x2: x1, y1: f(Y(v)), y2: f(Y(v)), class: "gridline"}));
    grid.append(svg("text", {x: x0 - 8, y: f(Y(v) + 4), "text-anchor": "end", class: "tick"}, v === 0 ? "0" : fmtSize(v).replace(".0 GiB", " GiB")));
  }
  const tstep = niceStep(tmax, 8);
  for (let t = 0; t <= tmax + 1e-9; t += tstep) {
    grid.append(svg("line", {x1: f(X(t)), x2: f(X(t)), y1: y0, y2: y0 + 4, class: "axis"}));
    grid.append(svg("text", {x: f(X(t)), y: y0 + 18, "text-anchor": "middle", class: "tick"}, `${+t.toFixed(3)}`));
  }
  grid.append(svg("text", {x: (x0 + x1) / 2, y: H - 4, "text-anchor": "middle", class: "axis-title"}, "seconds since the job started"));
  grid.append(svg("line", {x1: x0, x2: x1, y1: y0, y2: y0, class: "axis"}));
  grid.append(svg("line", {x1: x0, x2: x0, y1: y0, y2: y1, class: "axis"}));
  el_.append(grid);

  // the measured series
  const pts = (key) => s.map((p) => `${f(X(p.t))},${f(Y(p[key]))}`).join(" ");
  el_.append(svg("polygon", {points: `${f(X(s[0].t))},${y0} ${pts("rss")} ${f(X(s[s.length - 1].t))},${y0}`, class: "rss-area"}));
  for (const [key, cls] of [["file", "file"], ["anon", "anon"], ["rss", "rss"]]) {
    el_.append(svg("polyline", {points: pts(key), class: `series ${cls}`, "data-series": key}));
  }

  // reference lines: budget, prediction, measured peak (labels kept apart on the right)
  const refs = [];
  if (predicted) refs.push({key: "predicted", v: predicted, label: `predicted ${fmtSize(predicted)}`});
  if (peak) refs.push({key: "peak", v: peak, label: `peak ${fmtSize(peak)}`});
  if (budget !== null && budgetOnScale) refs.push({key: "budget", v: budget, label: `budget ${fmtSize(budget)}`});
  const labels = refs.map((r) => ({...r, y: Y(r.v)})).sort((a, b) => a.y - b.y);
  for (let n = 1; n < labels.length; n++) labels[n].ly = Math.max(labels[n].y, (labels[n - 1].ly ?? labels[n - 1].y) + 13);
  if (labels.length) labels[0].ly = labels[0].y;
  for (const r of labels) {
    el_.append(svg("line", {x1: x0, x2: x1, y1: f(r.y), y2: f(r.y), class: `ref ${r.key}`, "data-ref": r.key, "data-value": r.v}));
    el_.append(svg("text", {x: x1 + 6, y: f((r.ly ?? r.y) + 4), class: `ref-label ${r.key}`}, r.label));
  }
  if (budget !== null && !budgetOnScale) {
    el_.append(svg("text", {x: x1 + 6, y: y1 + 4, class: "ref-label budget", "data-ref": "budget-offscale"},
                   `budget ${fmtSize(budget)} ↑`));
  }

  // legend and summary
  $("memory-legend").replaceChildren(
    ...[["rss", "RSS"], ["anon", "anonymous"], ["file", "file-backed"]].map(([c, t]) => el("span", {class: `key ${c}`, text: t})),
    ...Object.entries(PHASE_COLORS).map(([p, c]) => el("span", {class: "key phase", style: `--c:${c}`, text: p})),
    el("span", {class: "key predicted", text: "prediction"}), el("span", {class: "key peak", text: "measured peak"}),
    budget !== null ? el("span", {class: "key budget", text: budgetOnScale ? "worker budget" : `worker budget ${fmtSize(budget)} (off scale)`}) : null);
  const pct = peak && predicted ? ` — ${Math.round(100 * peak / predicted)}% of the prediction` : "";
  $("memory-summary").textContent = `predicted ${fmtSize(predicted)}${j.prediction_source ? ` (${j.prediction_source})` : ""} · ` +
    `measured peak ${fmtSize(peak)}${pct}${budget !== null ? ` · budget ${fmtSize(budget)}` : ""} · ${s.length} samples, attempt ${m.attempt}`;
}

// ---------- fleet ----------

async function refreshFleet() {
  const [{data: workers}, {data: models}] = await Promise.all([api("v1/workers"), api("v1/models")]);
  state.models = models;
  const tbody = $("worker-rows");
  tbody.replaceChildren(...workers.map((w) => el("tr", {"data-testid": "worker-row", "data-worker": w.name, "data-alive": w.alive ? "true" : "false"},
    el("td", {}, el("b", {text: w.name}), el("div", {class: "small muted", text: w.host})),
    el("td", {}, el("span", {class: `dot ${w.alive ? (w.state === "ready" ? "ok" : "warn") : "dead"}`}),
      w.alive ? w.state : "gone", w.state_reason ? el("div", {class: "small muted", text: w.state_reason}) : null),
    el("td", {text: w.model}), el("td", {text: w.backend}), el("td", {text: w.precision}), el("td", {text: w.memory_mode}),
    el("td", {class: "num", "data-testid": "budget", title: w.max_budget_bytes ? `configured ${fmtSize(w.max_budget_bytes)}` : null},
      fmtSize(w.budget_bytes), w.max_budget_bytes && w.max_budget_bytes !== w.budget_bytes ? el("div", {class: "small muted", text: `of ${fmtSize(w.max_budget_bytes)}`}) : null),
    el("td", {class: "num", "data-testid": "resident", text: fmtSize(w.resident_bytes)}),
    el("td", {}, w.current_job_id ? el("a", {href: `#/job/${w.current_job_id}`}, el("code", {text: short(w.current_job_id)})) : el("span", {class: "muted", text: "idle"})),
    el("td", {class: "small", text: ago(w.last_seen)}))));
  $("workers-empty").hidden = workers.length > 0;
  const alive = workers.filter((w) => w.alive).length;
  $("workers-summary").textContent = `${alive} alive of ${workers.length}`;
  $("models").replaceChildren(...models.map((m) => el("div", {class: "model", "data-testid": "model", "data-model": m.name},
    el("h3", {}, m.name, el("span", {class: "muted small", text:
      ` · ${m.workers} worker(s) · largest budget ${fmtSize(m.largest_budget_bytes)} · ${m.runtimes.join(", ")}`})),
    el("p", {class: "small", "data-testid": "model-defaults-line", text: `${m.defaults.family} (${m.defaults.pipeline}, ` +
      `${m.defaults.scheduler}): by default ${m.defaults.steps} steps, guidance ${m.defaults.guidance_scale}` +
      `${m.defaults.guidance_doubles_batch ? "" : " (an embedding)"}, ${m.defaults.width}×${m.defaults.height}`}),
    m.profiles.length ? el("div", {class: "scroll"}, el("table", {class: "grid", "data-testid": "profiles"},
      el("thead", {}, el("tr", {}, ["Runtime", "Shape", "Images / pass", "CFG (2× batch)", "Peak", "Base", "Jobs", "s / step", "s / image beside", "Updated"].map(
        (h, n) => el("th", {class: n >= 4 && n <= 8 ? "num" : null, text: h})))),
      el("tbody", {}, m.profiles.map((p) => el("tr", {"data-testid": "profile-row"},
        el("td", {text: `${p.backend}/${p.precision}/${p.memory_mode}`}), el("td", {text: `${p.width}×${p.height}`}),
        el("td", {text: p.images_per_pass}), el("td", {text: p.guidance ? "yes" : "no"}),
        el("td", {class: "num", text: fmtSize(p.peak_bytes)}), el("td", {class: "num", text: fmtSize(p.base_bytes)}),
        el("td", {class: "num", text: p.samples}),
        el("td", {class: "num", "data-testid": "profile-step", text: p.step_s === null ? "—" : p.step_s.toFixed(3)}),
        el("td", {class: "num", text: p.image_overhead_s === null ? "—" : p.image_overhead_s.toFixed(2)}),
        el("td", {class: "small", text: ago(p.updated_at)}))))))
      : el("p", {class: "muted small", text: "No memory profile yet: the first job of each shape measures one."}))));
  $("models-empty").hidden = models.length > 0;
}

// ---------- routing and polling ----------

function currentRoute() {
  const h = location.hash.replace(/^#\/?/, "");
  const [name, id] = h.split("/");
  if (name === "job" && id) return {view: "job", id};
  if (name === "gallery" || name === "fleet") return {view: name};
  return {view: "jobs"};
}

function render() {
  const r = currentRoute();
  for (const v of ["jobs", "gallery", "job", "fleet"]) {
    $(`view-${v}`).hidden = v !== r.view;
  }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === r.view);
  if (r.view === "jobs") renderJobs();
  if (r.view === "gallery") renderGallery();
  if (r.view === "job") {
    if (!state.job || state.job.id !== r.id) {
      $("job-detail").replaceChildren(el("div", {class: "card muted", text: "Loading…"}));
      $("memory-card").hidden = true;
    } else renderJob();
  }
}

function showBanner(text) {
  const b = $("banner");
  b.textContent = text;
  b.hidden = !text;
  clearTimeout(showBanner.t);
  if (text) showBanner.t = setTimeout(() => { b.hidden = true; }, 6000);
}

async function refreshView() {
  const r = currentRoute();
  if (r.view === "jobs") await refreshJobs();
  else if (r.view === "gallery") await refreshGallery();
  else if (r.view === "job") await refreshJob(r.id);
  else if (r.view === "fleet") await refreshFleet();
  return r;
}

function pollDelay(r) {
  if (state.keyNeeded) return POLL_IDLE_MS;
  if (r.view === "fleet") return POLL_FLEET_MS;
  if (r.view === "job") return state.job && LIVE.has(state.job.status) ? POLL_LIVE_MS : POLL_IDLE_MS;
  const live = [...state.jobs.values()].some((j) => LIVE.has(j.status));
  return live ? POLL_LIVE_MS : POLL_IDLE_MS;
}

async function tick() {
  if (state.ticking) { state.again = true; return; }
  state.ticking = true;
  clearTimeout(state.timer);
  let r = currentRoute();
  try {
    if (!state.keyNeeded) r = await refreshView();  // until a key is given there is nothing to show
  } catch (e) {
    if (e.status !== 401) showBanner(`The API did not answer: ${e.message}`);
  } finally {
    state.ticking = false;
  }
  if (state.again) { state.again = false; return tick(); }
  state.timer = setTimeout(tick, pollDelay(r));
}

function kick() { clearTimeout(state.timer); tick(); }

// ---------- start ----------

function start() {
  $("submit-form").addEventListener("submit", submitJob);
  $("key-form").addEventListener("submit", (ev) => { ev.preventDefault(); const k = $("key-input").value.trim(); if (k) useKey(k); });
  $("key-open").addEventListener("click", () => showKeyPanel(state.key ? "Replace the key this browser sends." : "Enter an API key.", null));
  $("key-close").addEventListener("click", () => { $("key-panel").hidden = true; });
  $("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    state.key = null;
    resetData();
    $("key-panel").hidden = true;
    renderKeyStatus();
    loadModels();
    kick();
  });
  $("jobs-more").addEventListener("click", moreJobs);
  $("gallery-more").addEventListener("click", moreGallery);
  window.addEventListener("hashchange", () => { render(); kick(); window.scrollTo(0, 0); });
  renderKeyStatus();
  render();
  loadSchema();
  loadModels();
  tick();
}

start();
