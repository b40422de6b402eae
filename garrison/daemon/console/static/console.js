// Garrison console: live job progress (server-sent events from the jobs API) and the chat
// playground (streamed from /v1/chat/completions). Same origin only; the session cookie goes
// with every request, and the CSRF token from the page's meta tag with every POST.
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

// ---- job page ---------------------------------------------------------------------------------
function followJob(section) {
  const jobId = section.dataset.job;
  const after = section.dataset.after || "0";
  const bar = document.getElementById("job-progress");
  const text = document.getElementById("job-progress-text");
  const stateEl = document.getElementById("job-state");
  const events = document.getElementById("events");
  const curves = document.getElementById("curves");
  let redraw = null;

  function refreshCurves() {
    if (redraw) return;
    redraw = setTimeout(async () => {
      redraw = null;
      const response = await fetch(`/console/jobs/${encodeURIComponent(jobId)}/curves`,
                                   {headers: {Accept: "image/svg+xml"}});
      if (response.ok) curves.innerHTML = await response.text();
    }, 300);
  }

  function setState(state) {
    const marks = {queued: "◌", running: "▶", succeeded: "✔", failed: "✖", cancelled: "■"};
    const span = document.createElement("span");
    span.className = `status state-${state}`;
    span.textContent = `${marks[state] || ""} ${state}`;
    stateEl.replaceChildren(span);
  }

  const source = new EventSource(`/v1/garrison/jobs/${encodeURIComponent(jobId)}/events?stream=true&after=${after}`);
  source.addEventListener("progress", (message) => {
    const p = JSON.parse(message.data);
    if (typeof p.fraction === "number") {
      bar.value = p.fraction;
      text.textContent = `${Math.round(p.fraction * 100)} % ${p.message || ""}`;
    } else {
      text.textContent = p.message || "";
    }
    setState(p.state);
  });
  source.addEventListener("event", (message) => {
    const e = JSON.parse(message.data);
    const li = document.createElement("li");
    const level = document.createElement("span");
    level.className = `level-${e.level}`;
    level.textContent = `[${e.level}]`;
    const type = document.createElement("strong");
    type.textContent = e.type;
    li.append(level, ` ${new Date(e.at * 1000).toISOString().replace("T", " ").slice(0, 19)} UTC `, type,
              ` ${e.message}`);
    events.prepend(li);
    if (e.type === "metrics") refreshCurves();
  });
  source.addEventListener("done", (message) => {
    const job = JSON.parse(message.data);
    setState(job.state);
    source.close();
    const form = document.getElementById("cancel-form");
    if (form) form.remove();
    refreshCurves();
  });
  source.addEventListener("shutdown", () => source.close());
}

// ---- chat page --------------------------------------------------------------------------------
function chat(form) {
  const log = document.getElementById("chat-log");
  const select = document.getElementById("chat-model");
  const input = document.getElementById("chat-input");
  const status = document.getElementById("chat-status");
  const send = document.getElementById("chat-send");
  const stop = document.getElementById("chat-stop");
  const messages = [];
  let controller = null;

  fetch("/v1/models").then((r) => r.json()).then((body) => {
    select.replaceChildren();
    for (const model of body.data || []) {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = model.id;
      select.append(option);
    }
    if (!select.options.length) {
      const option = document.createElement("option");
      option.value = "";
      option.textContent = "no model this key may use";
      select.append(option);
    }
  });

  function bubble(role, content) {
    const li = document.createElement("li");
    li.className = `msg msg-${role}`;
    const who = document.createElement("strong");
    who.textContent = role === "user" ? "You: " : "Model: ";
    const body = document.createElement("span");
    body.className = "content";
    body.textContent = content;
    li.append(who, body);
    log.append(li);
    return body;
  }

  function number(name) {
    const value = form.elements[name].value;
    return value === "" ? undefined : Number(value);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || !select.value) return;
    messages.push({role: "user", content: text});
    bubble("user", text);
    input.value = "";
    const out = bubble("assistant", "");
    const system = form.elements.system.value.trim();
    const body = {model: select.value, stream: true, temperature: number("temperature"), top_p: number("top_p"),
                  max_tokens: number("max_tokens"), seed: number("seed"),
                  messages: system ? [{role: "system", content: system}, ...messages] : messages};
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    status.textContent = "Generating…";
    let answer = "";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", signal: controller.signal,
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrfToken()},
        body: JSON.stringify(body),
      });
      if (!response.ok) {
        const error = await response.json().catch(() => ({}));
        throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of block.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) {
              answer += delta.content;
              out.textContent = answer;
              out.dataset.chunks = String(Number(out.dataset.chunks || 0) + 1);
            }
          }
        }
      }
      status.textContent = "Done.";
    } catch (error) {
      status.textContent = error.name === "AbortError" ? "Stopped." : `Error: ${error.message}`;
    } finally {
      messages.push({role: "assistant", content: answer});
      send.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  document.getElementById("chat-clear").addEventListener("click", () => {
    messages.length = 0;
    log.replaceChildren();
    status.textContent = "Conversation cleared.";
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.querySelector("#live[data-job]");
  if (live) followJob(live);
  const form = document.getElementById("chat-form");
  if (form) chat(form);
});
