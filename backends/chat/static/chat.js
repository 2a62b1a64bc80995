// Chat page logic: one WebSocket to the backend that served the page (through the
// load balancer), app-level pings below the proxy's idle timeout, reconnection with
// capped exponential backoff and jitter after failures, and promptly (with a short jitter)
// when the server or the load balancer says it is moving the connection: close code 1012
// (Service Restart, a rebalance) or 1001 (Going Away, a drain or a restart). Everything received is rendered with
// textContent, never parsed as HTML.
"use strict";

(() => {
  const PING_INTERVAL_MS = 30000; // below lbproxy's default 60 s idle timeout
  const PONG_TIMEOUT_MS = 10000; // no reply to a ping in this long: connection is dead
  const BACKOFF_BASE_MS = 500; // first retry after 0.25-0.5 s
  const BACKOFF_MAX_MS = 15000; // retries never wait more than 15 s
  // 1012/1001: not a failure but a move; reconnect within this jitter (spread so that the
  // clients of one server do not all come back in the same instant) and keep no backoff.
  const MOVED_CODES = [1012, 1001];
  const MOVED_JITTER_MS = 500;
  const MAX_MESSAGE_BYTES = 65536; // the server's limit on one frame
  const MAX_RENDERED = 500; // older messages are dropped from the page

  const $ = (id) => document.getElementById(id);
  const statusEl = $("status");
  const logEl = $("log");
  const listEl = $("messages");
  const form = $("composer");
  const userInput = $("user");
  const textInput = $("text");
  const noticeEl = $("notice");
  const encoder = new TextEncoder();

  let ws = null; // the current socket, or null while waiting to reconnect
  let backend = null; // name from the server's hello
  let attempt = 0; // consecutive failed connection attempts
  let pingTimer = null;
  let pongTimer = null;
  let retryTimer = null;
  let countdownTimer = null;

  function wsUrl() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    return url.href;
  }

  function setStatus(text, state) {
    statusEl.textContent = text;
    statusEl.dataset.state = state;
  }

  function showNotice(text) {
    noticeEl.textContent = text;
  }

  function loadUser() {
    try {
      return localStorage.getItem("lbproxy-chat.user") || "";
    } catch (e) {
      return "";
    }
  }

  function saveUser(name) {
    try {
      localStorage.setItem("lbproxy-chat.user", name);
    } catch (e) {
      // storage unavailable (private mode, file://): the name just isn't remembered
    }
  }

  function nearBottom() {
    return logEl.scrollTop + logEl.clientHeight >= logEl.scrollHeight - 40;
  }

  function append(li) {
    const stick = nearBottom();
    listEl.append(li);
    while (listEl.childElementCount > MAX_RENDERED) listEl.firstElementChild.remove();
    if (stick) logEl.scrollTop = logEl.scrollHeight;
  }

  function appendSystem(text) {
    const li = document.createElement("li");
    li.className = "system";
    li.textContent = text;
    append(li);
  }

  // One of the six badge colours in chat.css, the same for a backend name on every page.
  function hue(name) {
    let h = 0;
    for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
    return h % 6;
  }

  function appendMessage(m) {
    const li = document.createElement("li");
    li.className = "msg";
    if (m.user === userInput.value.trim()) li.classList.add("mine");
    if (typeof m.id === "string") li.dataset.id = m.id;

    const meta = document.createElement("div");
    meta.className = "meta";
    // Reads "alice via ECS01"; the backend is a badge coloured per backend name.
    const who = document.createElement("span");
    who.className = "who";
    const user = document.createElement("span");
    user.className = "user";
    user.textContent = String(m.user);
    const badge = document.createElement("span");
    badge.className = `backend b${hue(String(m.backend))}`;
    badge.textContent = String(m.backend);
    who.append(user, " via ", badge);
    meta.append(who);
    if (typeof m.ts === "number") {
      const when = new Date(m.ts);
      const time = document.createElement("time");
      time.dateTime = when.toISOString();
      time.textContent = when.toLocaleTimeString();
      meta.append(time);
    }

    const body = document.createElement("div");
    body.className = "text";
    body.textContent = String(m.text);

    li.append(meta, body);
    append(li);
  }

  function clearTimers() {
    clearInterval(pingTimer);
    clearInterval(countdownTimer);
    clearTimeout(pongTimer);
    clearTimeout(retryTimer);
    pingTimer = pongTimer = retryTimer = countdownTimer = null;
  }

  function connect() {
    clearTimers();
    setStatus("connecting…", "connecting");
    let sock;
    try {
      sock = new WebSocket(wsUrl());
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    sock.onopen = () => {
      if (sock === ws) startPings(sock);
    };
    sock.onmessage = (ev) => {
      if (sock === ws) onFrame(ev.data);
    };
    sock.onclose = (ev) => {
      if (sock !== ws) return;
      ws = null;
      const moved = backend !== null && MOVED_CODES.includes(ev.code);
      if (moved) appendSystem(`moved off ${backend} (${ev.code}): reconnecting`);
      else if (backend) appendSystem(`disconnected from ${backend}`);
      backend = null;
      if (moved) reconnectSoon();
      else scheduleReconnect();
    };
    sock.onerror = () => {}; // a close event always follows
  }

  function startPings(sock) {
    pingTimer = setInterval(() => {
      if (sock.readyState !== WebSocket.OPEN) return;
      sock.send(JSON.stringify({ type: "ping" }));
      if (pongTimer === null) pongTimer = setTimeout(() => abandon(sock), PONG_TIMEOUT_MS);
    }, PING_INTERVAL_MS);
  }

  // The connection stopped answering: don't wait for TCP to notice, start over.
  function abandon(sock) {
    if (sock !== ws) return;
    ws = null;
    sock.onopen = sock.onmessage = sock.onclose = null;
    try {
      sock.close(4000, "no pong");
    } catch (e) {
      // already closed
    }
    if (backend) appendSystem(`lost connection to ${backend}`);
    backend = null;
    scheduleReconnect();
  }

  function scheduleReconnect() {
    clearTimers();
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
    const delay = cap / 2 + (Math.random() * cap) / 2; // jitter: 50-100 % of the cap
    attempt = Math.min(attempt + 1, 20);
    const due = Date.now() + delay;
    const tick = () => {
      const s = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setStatus(`reconnecting in ${s}s…`, "reconnecting");
    };
    tick();
    countdownTimer = setInterval(tick, 250);
    retryTimer = setTimeout(connect, delay);
  }

  // The connection was moved (1012/1001), not lost: back within a short random delay.
  function reconnectSoon() {
    clearTimers();
    attempt = 0;
    setStatus("reconnecting…", "moving");
    retryTimer = setTimeout(connect, Math.random() * MOVED_JITTER_MS);
  }

  function onFrame(data) {
    clearTimeout(pongTimer); // any frame proves the connection is alive
    pongTimer = null;
    let m;
    try {
      m = JSON.parse(data);
    } catch (e) {
      return;
    }
    if (m === null || typeof m !== "object") return;
    switch (m.type) {
      case "hello":
        backend = String(m.backend);
        attempt = 0;
        setStatus(`connected to ${backend}`, "connected");
        appendSystem(`connected to ${backend}`);
        break;
      case "message":
        appendMessage(m);
        break;
      case "error":
        showNotice(String(m.error));
        break;
      default: // "pong" and anything newer than this page
        break;
    }
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const user = userInput.value.trim();
    const text = textInput.value;
    if (!user) {
      showNotice("Set a user name first.");
      userInput.focus();
      return;
    }
    if (!text.trim()) return;
    const payload = JSON.stringify({ type: "message", user, text });
    if (encoder.encode(payload).length > MAX_MESSAGE_BYTES) {
      showNotice(`message too large (max ${MAX_MESSAGE_BYTES} bytes)`);
      return;
    }
    if (!ws || ws.readyState !== WebSocket.OPEN || !backend) {
      showNotice("Not connected: message not sent.");
      return;
    }
    ws.send(payload);
    saveUser(user);
    showNotice("");
    textInput.value = "";
    textInput.focus();
  });

  // Back online after a network change: don't sit out the rest of the backoff.
  window.addEventListener("online", () => {
    if (ws === null) connect();
  });

  userInput.value = loadUser();
  (userInput.value ? textInput : userInput).focus();
  connect();
})();
