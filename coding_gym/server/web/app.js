/* Coding Gym web UI: a small client for the environment's WebSocket protocol.
 *
 * Protocol summary (text JSON frames, exactly one reply per request, in order):
 *   -> {"type":"reset","data":{}}            <- observation | error
 *   -> {"type":"step","data":{"code":"..."}} <- observation | error
 *   -> {"type":"state"}                      <- state | error
 *   -> {"type":"close"}
 * Replies are matched to requests with a FIFO of pending requests.
 */
(function () {
  "use strict";

  var TOKEN_KEY = "coding_gym.token";
  var CODE_KEY = "coding_gym.code";
  var THEME_KEY = "coding_gym.theme";
  var INDENT = "    ";
  var RECONNECT_MIN_MS = 1000;
  var RECONNECT_MAX_MS = 15000;

  var DEFAULT_CODE = [
    "# Each Run is one step of the episode. Globals persist",
    "# between steps: run this a few times and watch the",
    "# counter grow. Reset starts a fresh interpreter.",
    "import math",
    "",
    "counter = globals().get(\"counter\", 0) + 1",
    "print(f\"step {counter}: pi is about {math.pi:.5f}\")",
    "",
    "for i in range(3):",
    "    print(\"  square of\", i, \"is\", i * i)",
    ""
  ].join("\n");

  // ------------------------------------------------------------------ DOM

  function $(id) {
    return document.getElementById(id);
  }

  var el = {
    code: $("code"),
    gutter: $("gutter-lines"),
    cursorPos: $("cursor-pos"),
    run: $("run"),
    runLabel: document.querySelector("#run .run-label"),
    runKbd: $("run-kbd"),
    runHintMod: $("run-hint-mod"),
    reset: $("reset"),
    status: $("status"),
    statusText: $("status-text"),
    reconnect: $("reconnect"),
    tokenButton: $("token-button"),
    themeToggle: $("theme-toggle"),
    themeIcon: $("theme-icon"),
    episodeId: $("episode-id"),
    stepCount: $("step-count"),
    errorBanner: $("error-banner"),
    errorCode: $("error-code"),
    errorMessage: $("error-message"),
    errorDismiss: $("error-dismiss"),
    resultPanel: $("result-panel"),
    resultLabel: $("result-label"),
    exitCode: $("exit-code"),
    reward: $("reward"),
    wallTime: $("wall-time"),
    cpuTime: $("cpu-time"),
    warnings: $("warnings"),
    stdout: $("stdout"),
    stderr: $("stderr"),
    history: $("history"),
    historyEmpty: $("history-empty"),
    tokenDialog: $("token-dialog"),
    tokenForm: $("token-form"),
    tokenReason: $("token-reason"),
    tokenInput: $("token-input"),
    tokenShow: $("token-show"),
    tokenCancel: $("token-cancel"),
    tokenForget: $("token-forget")
  };

  // ---------------------------------------------------------------- state

  var state = {
    ws: null,
    connected: false,
    gotReply: false, // any reply received on the current socket
    pending: [], // FIFO of {type, meta}
    busy: false, // a step is in flight
    authRequired: false,
    reconnectDelay: RECONNECT_MIN_MS,
    reconnectTimer: null,
    countdownTimer: null,
    reconnectAt: 0,
    history: [],
    selectedIndex: -1,
    stepCount: 0,
    episodeId: null
  };

  // ------------------------------------------------------------- storage

  function storageGet(key) {
    try {
      return window.localStorage.getItem(key);
    } catch (e) {
      return null;
    }
  }

  function storageSet(key, value) {
    try {
      if (value === null || value === undefined || value === "") {
        window.localStorage.removeItem(key);
      } else {
        window.localStorage.setItem(key, value);
      }
    } catch (e) {
      /* storage unavailable (private mode, etc.): ignore */
    }
  }

  function getToken() {
    return storageGet(TOKEN_KEY) || "";
  }

  // ---------------------------------------------------------- formatting

  function formatSeconds(value) {
    if (typeof value !== "number" || !isFinite(value)) {
      return "—";
    }
    if (value < 0) {
      value = 0;
    }
    if (value < 0.001) {
      return (value * 1e6).toFixed(0) + " µs";
    }
    if (value < 1) {
      var ms = value * 1000;
      return (ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : ms.toFixed(0)) + " ms";
    }
    if (value < 60) {
      return value.toFixed(value < 10 ? 2 : 1) + " s";
    }
    var minutes = Math.floor(value / 60);
    return minutes + "m " + (value - minutes * 60).toFixed(0) + "s";
  }

  function formatReward(value) {
    if (typeof value !== "number" || !isFinite(value)) {
      return "—";
    }
    if (Number.isInteger(value)) {
      return String(value);
    }
    return String(parseFloat(value.toFixed(4)));
  }

  function clockTime(date) {
    function pad(n) {
      return n < 10 ? "0" + n : String(n);
    }
    return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
  }

  /* First non-blank line of the code, and how many other non-blank lines follow. */
  function codePreview(code) {
    var lines = String(code).split("\n");
    var first = "";
    var nonEmpty = 0;
    for (var i = 0; i < lines.length; i++) {
      if (lines[i].trim() !== "") {
        nonEmpty++;
        if (!first) {
          first = lines[i].trim();
        }
      }
    }
    if (first.length > 120) {
      first = first.slice(0, 119) + "…";
    }
    return { first: first || "(empty)", more: Math.max(0, nonEmpty - 1) };
  }

  // -------------------------------------------------------------- status

  function setStatus(kind, text) {
    el.status.setAttribute("data-state", kind);
    el.statusText.textContent = text;
  }

  function refreshStatus() {
    if (state.connected) {
      setStatus(state.busy ? "running" : "connected", state.busy ? "Running…" : "Connected");
    }
  }

  function updateControls() {
    var canSend = state.connected && !state.authRequired;
    el.run.disabled = !canSend || state.busy;
    el.reset.disabled = !canSend;
    el.run.classList.toggle("is-running", state.busy);
    el.runLabel.textContent = state.busy ? "Running" : "Run";
    el.run.setAttribute("aria-busy", state.busy ? "true" : "false");
    el.resultPanel.setAttribute("aria-busy", state.busy ? "true" : "false");
    el.reconnect.hidden = state.connected || state.authRequired;
    var reruns = el.history.querySelectorAll(".history-rerun");
    for (var i = 0; i < reruns.length; i++) {
      reruns[i].disabled = !canSend || state.busy;
    }
    refreshStatus();
  }

  // -------------------------------------------------------------- errors

  function showError(message, code) {
    el.errorCode.textContent = code || "";
    el.errorMessage.textContent = message || "Unknown error";
    el.errorBanner.hidden = false;
  }

  function hideError() {
    el.errorBanner.hidden = true;
  }

  // --------------------------------------------------------- connection

  function socketUrl() {
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    // The UI lives under <prefix>/web/; the socket is <prefix>/ws.
    var path = window.location.pathname;
    var match = path.match(/^(.*?)\/web(\/.*)?$/);
    var prefix = match ? match[1] : "";
    var url = scheme + "//" + window.location.host + prefix + "/ws";
    var token = getToken();
    if (token) {
      url += "?token=" + encodeURIComponent(token);
    }
    return url;
  }

  function clearReconnectTimers() {
    if (state.reconnectTimer) {
      clearTimeout(state.reconnectTimer);
      state.reconnectTimer = null;
    }
    if (state.countdownTimer) {
      clearInterval(state.countdownTimer);
      state.countdownTimer = null;
    }
  }

  function connect() {
    clearReconnectTimers();
    if (state.ws) {
      var old = state.ws;
      state.ws = null;
      try {
        old.close(1000);
      } catch (e) {
        /* ignore */
      }
    }
    state.connected = false;
    state.gotReply = false;
    state.pending = [];
    state.busy = false;
    state.authRequired = false;
    setStatus("connecting", "Connecting…");
    updateControls();

    var ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (e) {
      showError("Could not open a WebSocket: " + e.message);
      scheduleReconnect();
      return;
    }
    state.ws = ws;

    ws.onopen = function () {
      if (ws !== state.ws) {
        return;
      }
      state.connected = true;
      updateControls();
      send("reset", {}, { auto: true });
    };

    ws.onmessage = function (event) {
      if (ws !== state.ws) {
        return;
      }
      handleFrame(event.data);
    };

    ws.onerror = function () {
      /* the close event that follows carries the details */
    };

    ws.onclose = function (event) {
      if (ws !== state.ws) {
        return;
      }
      var wasBusy = state.busy;
      var hadToken = !!getToken();
      state.ws = null;
      state.connected = false;
      state.pending = [];
      state.busy = false;

      if ((event.code === 4401 || event.code === 1008) && !state.gotReply) {
        state.authRequired = true;
        setStatus("auth", "Token required");
        updateControls();
        if (hadToken) {
          storageSet(TOKEN_KEY, null);
          openTokenDialog("The stored token was rejected. Enter a valid token.", true);
        } else {
          openTokenDialog("This server needs an access token before it accepts connections.", false);
        }
        return;
      }

      if (wasBusy) {
        showError("The connection was lost while the code was running.", "DISCONNECTED");
        el.resultLabel.textContent = "Connection lost";
        el.resultPanel.classList.add("is-stale");
      }
      scheduleReconnect(event.reason);
    };
  }

  function scheduleReconnect(reason) {
    clearReconnectTimers();
    var delay = state.reconnectDelay;
    state.reconnectDelay = Math.min(state.reconnectDelay * 2, RECONNECT_MAX_MS);
    state.reconnectAt = Date.now() + delay;
    var suffix = reason ? " (" + reason + ")" : "";

    function tick() {
      var left = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
      setStatus("disconnected", "Disconnected · retry in " + left + "s" + suffix);
    }

    tick();
    state.countdownTimer = setInterval(tick, 500);
    state.reconnectTimer = setTimeout(connect, delay);
    updateControls();
  }

  function send(type, data, meta) {
    var ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return false;
    }
    var message = { type: type };
    if (data !== undefined && data !== null) {
      message.data = data;
    }
    ws.send(JSON.stringify(message));
    if (type !== "close") {
      state.pending.push({ type: type, meta: meta || {} });
    }
    return true;
  }

  function handleFrame(raw) {
    var msg;
    try {
      msg = JSON.parse(raw);
    } catch (e) {
      showError("The server sent a frame that is not valid JSON.", "CLIENT");
      return;
    }
    if (!msg || typeof msg !== "object") {
      return;
    }
    state.gotReply = true;
    state.reconnectDelay = RECONNECT_MIN_MS;
    var request = state.pending.shift() || null;
    var data = msg.data && typeof msg.data === "object" ? msg.data : {};

    if (msg.type === "observation") {
      handleObservation(data, request);
    } else if (msg.type === "state") {
      handleState(data);
    } else if (msg.type === "error") {
      handleError(data, request);
    } else if (window.console) {
      console.warn("coding_gym: unexpected message type", msg.type);
    }

    if (request && request.type === "step") {
      state.busy = false;
    }
    updateControls();
  }

  // ----------------------------------------------------------- handlers

  function handleObservation(data, request) {
    var info = data.info && typeof data.info === "object" ? data.info : null;
    var kind = request ? request.type : "step";

    if (kind === "reset") {
      clearHistory();
      state.stepCount = 0;
      el.stepCount.textContent = "0";
      renderResult(data, info, { reset: true });
      el.resultLabel.textContent = request && request.meta.auto ? "New episode (connected)" : "New episode";
    } else {
      var step = info && typeof info.step === "number" ? info.step : state.stepCount + 1;
      var code = request && typeof request.meta.code === "string" ? request.meta.code : "";
      var obs = data.observation || {};
      renderResult(data, info, { reset: false });
      el.resultLabel.textContent = "Step " + step + " · " + clockTime(new Date());
      addHistory({
        step: step,
        code: code,
        exitCode: obs.exit_code,
        wall: info ? info.wall_time_s : undefined,
        failed: !!(info && (info.kill_reason || info.state_lost))
      });
      state.stepCount = step;
      el.stepCount.textContent = String(step);
    }

    if (info) {
      if (typeof info.episode_id === "string" && info.episode_id) {
        setEpisode(info.episode_id);
      }
      if (typeof info.step === "number") {
        state.stepCount = info.step;
        el.stepCount.textContent = String(info.step);
      }
    }

    // Refresh the authoritative episode id / step count.
    send("state");
  }

  function handleState(data) {
    if (typeof data.episode_id === "string") {
      setEpisode(data.episode_id);
    }
    if (typeof data.step_count === "number") {
      state.stepCount = data.step_count;
      el.stepCount.textContent = String(data.step_count);
    }
  }

  function handleError(data, request) {
    var message = typeof data.message === "string" ? data.message : "The server reported an error.";
    var code = typeof data.code === "string" ? data.code : "";
    showError(message, code);
    if (request && request.type === "step") {
      el.resultLabel.textContent = "Step failed · showing previous result";
      el.resultPanel.classList.add("is-stale");
    } else if (request && request.type === "reset") {
      el.resultLabel.textContent = "Reset failed";
    }
  }

  function setEpisode(id) {
    state.episodeId = id;
    el.episodeId.textContent = id || "—";
    el.episodeId.title = id || "";
  }

  // ------------------------------------------------------------- render

  function renderResult(data, info, opts) {
    var obs = data.observation && typeof data.observation === "object" ? data.observation : {};
    el.resultPanel.classList.remove("is-stale");
    el.stdout.textContent = typeof obs.stdout === "string" ? obs.stdout : "";
    el.stderr.textContent = typeof obs.stderr === "string" ? obs.stderr : "";
    el.stdout.scrollTop = 0;
    el.stderr.scrollTop = 0;

    var exit = obs.exit_code;
    el.exitCode.classList.remove("badge-ok", "badge-bad", "badge-none");
    if (!opts.reset && typeof exit === "number") {
      el.exitCode.textContent = String(exit);
      el.exitCode.classList.add(exit === 0 ? "badge-ok" : "badge-bad");
      el.exitCode.title = exit === 0 ? "Exited successfully" : "Exited with an error";
    } else {
      el.exitCode.textContent = "—";
      el.exitCode.classList.add("badge-none");
      el.exitCode.title = "";
    }

    el.reward.textContent = formatReward(data.reward);
    el.wallTime.textContent = info && !opts.reset ? formatSeconds(info.wall_time_s) : "—";
    el.cpuTime.textContent = info && !opts.reset ? formatSeconds(info.cpu_time_s) : "—";

    renderWarnings(info, data.done === true);
  }

  function renderWarnings(info, done) {
    var items = [];
    if (info) {
      var kill = info.kill_reason;
      if (kill) {
        var killText = {
          timeout: "Killed: the time limit was exceeded.",
          memory: "Killed: the memory limit was exceeded.",
          signal: "Killed by a signal.",
          crash: "The sandbox crashed while running this step."
        }[kill] || "Killed (" + kill + ").";
        items.push({ text: killText, cls: "warning-bad", id: "kill-reason" });
      }
      if (info.state_lost) {
        items.push({
          text: "Interpreter state was lost: variables from earlier steps are gone.",
          cls: "warning-bad",
          id: "state-lost"
        });
      }
      if (info.stdout_truncated) {
        items.push({ text: "stdout was truncated (output limit reached).", cls: "", id: "stdout-truncated" });
      }
      if (info.stderr_truncated) {
        items.push({ text: "stderr was truncated (output limit reached).", cls: "", id: "stderr-truncated" });
      }
    }
    if (done) {
      items.push({ text: "The episode is done. Press Reset to start a new one.", cls: "warning-info", id: "episode-done" });
    }

    el.warnings.textContent = "";
    items.forEach(function (item) {
      var li = document.createElement("li");
      li.className = "warning " + item.cls;
      li.id = item.id;
      li.textContent = item.text;
      el.warnings.appendChild(li);
    });
  }

  // ------------------------------------------------------------ history

  function clearHistory() {
    state.history = [];
    state.selectedIndex = -1;
    el.history.textContent = "";
    el.historyEmpty.hidden = false;
  }

  function addHistory(entry) {
    var index = state.history.length;
    state.history.push(entry);

    var li = document.createElement("li");
    li.className = "history-item";
    li.setAttribute("data-index", String(index));
    li.setAttribute("data-step", String(entry.step));

    var load = document.createElement("button");
    load.type = "button";
    load.className = "history-load";
    load.title = "Load this code into the editor\n\n" + (entry.code.length > 600 ? entry.code.slice(0, 600) + "\n…" : entry.code);

    var stepSpan = document.createElement("span");
    stepSpan.className = "history-step";
    stepSpan.textContent = "#" + entry.step;

    var codeSpan = document.createElement("span");
    codeSpan.className = "history-code";
    var preview = codePreview(entry.code);
    var textSpan = document.createElement("span");
    textSpan.className = "history-code-text";
    textSpan.textContent = preview.first;
    codeSpan.appendChild(textSpan);
    if (preview.more > 0) {
      var moreSpan = document.createElement("span");
      moreSpan.className = "history-more";
      moreSpan.textContent = "+" + preview.more + (preview.more === 1 ? " line" : " lines");
      codeSpan.appendChild(moreSpan);
    }

    var exitSpan = document.createElement("span");
    var hasExit = typeof entry.exitCode === "number";
    exitSpan.className = "history-exit " + (hasExit ? (entry.exitCode === 0 ? "badge-ok" : "badge-bad") : "badge-none");
    exitSpan.textContent = hasExit ? String(entry.exitCode) : "?";
    exitSpan.title = "Exit code";

    var timeSpan = document.createElement("span");
    timeSpan.className = "history-time";
    timeSpan.textContent = formatSeconds(entry.wall);
    timeSpan.title = "Wall time";

    load.appendChild(stepSpan);
    load.appendChild(codeSpan);
    load.appendChild(exitSpan);
    load.appendChild(timeSpan);
    load.addEventListener("click", function () {
      loadHistory(index, false);
    });

    var rerun = document.createElement("button");
    rerun.type = "button";
    rerun.className = "btn btn-ghost btn-tiny history-rerun";
    rerun.textContent = "Re-run";
    rerun.setAttribute("aria-label", "Re-run step " + entry.step);
    rerun.addEventListener("click", function () {
      loadHistory(index, true);
    });

    li.appendChild(load);
    li.appendChild(rerun);
    el.history.insertBefore(li, el.history.firstChild);
    el.historyEmpty.hidden = true;
    el.history.scrollTop = 0;
  }

  function loadHistory(index, andRun) {
    var entry = state.history[index];
    if (!entry) {
      return;
    }
    setEditorText(entry.code);
    state.selectedIndex = index;
    var items = el.history.querySelectorAll(".history-item");
    for (var i = 0; i < items.length; i++) {
      items[i].classList.toggle("is-selected", items[i].getAttribute("data-index") === String(index));
    }
    if (andRun) {
      runCode();
    }
  }

  // ------------------------------------------------------------ actions

  function runCode() {
    if (!state.connected || state.busy || state.authRequired) {
      return;
    }
    var code = el.code.value;
    hideError();
    if (send("step", { code: code }, { code: code })) {
      state.busy = true;
      el.resultLabel.textContent = "Running…";
      updateControls();
    }
  }

  function resetEpisode() {
    if (!state.connected || state.authRequired) {
      return;
    }
    hideError();
    send("reset", {}, {});
    el.resultLabel.textContent = "Resetting…";
  }

  // -------------------------------------------------------------- editor

  var editorState = { lineCount: 0, currentLine: -1, tabEscapes: false, saveTimer: null };

  function updateGutter() {
    var value = el.code.value;
    var lines = 1;
    for (var i = 0; i < value.length; i++) {
      if (value.charCodeAt(i) === 10) {
        lines++;
      }
    }
    if (lines !== editorState.lineCount) {
      var html = [];
      for (var n = 1; n <= lines; n++) {
        html.push("<div>" + n + "</div>");
      }
      el.gutter.innerHTML = html.join("");
      editorState.lineCount = lines;
      editorState.currentLine = -1;
    }
    updateCursor();
    syncScroll();
  }

  function updateCursor() {
    var value = el.code.value;
    var pos = el.code.selectionStart || 0;
    var before = value.slice(0, pos);
    var line = before.split("\n").length;
    var col = pos - (before.lastIndexOf("\n") + 1) + 1;
    el.cursorPos.textContent = "Ln " + line + ", Col " + col;
    if (line !== editorState.currentLine) {
      var prev = el.gutter.children[editorState.currentLine - 1];
      if (prev) {
        prev.classList.remove("current");
      }
      var cur = el.gutter.children[line - 1];
      if (cur) {
        cur.classList.add("current");
      }
      editorState.currentLine = line;
    }
  }

  function syncScroll() {
    el.gutter.style.transform = "translateY(" + -el.code.scrollTop + "px)";
  }

  function saveCodeSoon() {
    if (editorState.saveTimer) {
      clearTimeout(editorState.saveTimer);
    }
    editorState.saveTimer = setTimeout(function () {
      storageSet(CODE_KEY, el.code.value || " ");
    }, 300);
  }

  /* Replace [start, end) with text, keeping the browser's undo stack when possible. */
  function replaceRange(start, end, text, selStart, selEnd) {
    var ta = el.code;
    ta.focus();
    ta.setSelectionRange(start, end);
    var ok = false;
    try {
      ok = text === "" ? document.execCommand("delete", false) : document.execCommand("insertText", false, text);
    } catch (e) {
      ok = false;
    }
    var expected = ta.value.slice(start, start + text.length) === text;
    if (!ok || !expected) {
      ta.setRangeText(text, start, end, "end");
      onEditorInput();
    }
    if (typeof selStart === "number") {
      ta.setSelectionRange(selStart, typeof selEnd === "number" ? selEnd : selStart);
    }
    updateCursor();
  }

  function setEditorText(text) {
    var ta = el.code;
    if (ta.value === text) {
      return;
    }
    replaceRange(0, ta.value.length, text, 0, 0);
    ta.scrollTop = 0;
    ta.scrollLeft = 0;
    syncScroll();
  }

  /* Lines touched by the selection: [blockStart, blockEnd) covering whole lines. */
  function selectedBlock() {
    var ta = el.code;
    var value = ta.value;
    var s = ta.selectionStart;
    var e = ta.selectionEnd;
    var blockStart = value.lastIndexOf("\n", s - 1) + 1;
    var last = e;
    if (e > s && value.charAt(e - 1) === "\n") {
      last = e - 1; // a selection ending at column 0 does not include that line
    }
    var nl = value.indexOf("\n", last);
    var blockEnd = nl === -1 ? value.length : nl;
    if (blockEnd < blockStart) {
      blockEnd = blockStart;
    }
    return { start: blockStart, end: blockEnd, s: s, e: e, value: value };
  }

  /* Map an old caret offset inside the block through per-line edits at line starts. */
  function mapOffset(pos, block, deltas) {
    if (pos <= block.start) {
      return pos;
    }
    var offset = block.start;
    var shift = 0;
    var lines = block.value.slice(block.start, block.end).split("\n");
    for (var i = 0; i < lines.length; i++) {
      var lineEnd = offset + lines[i].length;
      if (pos <= lineEnd || i === lines.length - 1) {
        var col = pos - offset;
        var d = deltas[i];
        if (d < 0) {
          return pos + shift - Math.min(col, -d);
        }
        return pos + shift + (col > 0 ? d : 0);
      }
      shift += deltas[i];
      offset = lineEnd + 1;
    }
    return pos + shift;
  }

  function indentSelection() {
    var ta = el.code;
    var value = ta.value;
    var s = ta.selectionStart;
    var e = ta.selectionEnd;
    if (value.slice(s, e).indexOf("\n") === -1) {
      var lineStart = value.lastIndexOf("\n", s - 1) + 1;
      var col = s - lineStart;
      var spaces = INDENT.slice(col % INDENT.length);
      replaceRange(s, e, spaces);
      return;
    }
    var block = selectedBlock();
    var lines = value.slice(block.start, block.end).split("\n");
    var deltas = [];
    var out = lines.map(function (line) {
      if (line.length === 0) {
        deltas.push(0);
        return line;
      }
      deltas.push(INDENT.length);
      return INDENT + line;
    });
    var newStart = mapOffset(s, block, deltas);
    var newEnd = mapOffset(e, block, deltas);
    replaceRange(block.start, block.end, out.join("\n"), newStart, newEnd);
  }

  function dedentSelection() {
    var block = selectedBlock();
    var lines = block.value.slice(block.start, block.end).split("\n");
    var deltas = [];
    var changed = false;
    var out = lines.map(function (line) {
      var lead = line.match(/^ */)[0].length;
      var remove = 0;
      if (lead > 0) {
        remove = lead % INDENT.length || INDENT.length;
      } else if (line.charAt(0) === "\t") {
        remove = 1;
      }
      if (remove > 0) {
        changed = true;
      }
      deltas.push(-remove);
      return line.slice(remove);
    });
    if (!changed) {
      return;
    }
    var newStart = mapOffset(block.s, block, deltas);
    var newEnd = mapOffset(block.e, block, deltas);
    replaceRange(block.start, block.end, out.join("\n"), newStart, newEnd);
  }

  function newlineWithIndent() {
    var ta = el.code;
    var value = ta.value;
    var s = ta.selectionStart;
    var e = ta.selectionEnd;
    var lineStart = value.lastIndexOf("\n", s - 1) + 1;
    var before = value.slice(lineStart, s);
    var indent = before.match(/^[ \t]*/)[0];
    var code = before.replace(/#.*$/, "").trimEnd();
    if (/:$/.test(code)) {
      indent += INDENT;
    } else if (/^\s*(return|pass|break|continue|raise)\b/.test(before)) {
      indent = indent.slice(0, Math.max(0, indent.length - INDENT.length));
    }
    var text = "\n" + indent;
    replaceRange(s, e, text, s + text.length);
    ensureCaretVisible();
  }

  function smartBackspace() {
    var ta = el.code;
    var s = ta.selectionStart;
    if (s !== ta.selectionEnd || s === 0) {
      return false;
    }
    var value = ta.value;
    var lineStart = value.lastIndexOf("\n", s - 1) + 1;
    var before = value.slice(lineStart, s);
    if (before.length === 0 || /[^ ]/.test(before)) {
      return false;
    }
    var remove = before.length % INDENT.length || INDENT.length;
    replaceRange(s - remove, s, "", s - remove);
    return true;
  }

  function ensureCaretVisible() {
    // Browsers scroll to the caret after native input; our programmatic edits
    // may leave it at the very bottom, so nudge if needed.
    var ta = el.code;
    var lineHeight = parseFloat(getComputedStyle(ta).lineHeight) || 20;
    var line = ta.value.slice(0, ta.selectionStart).split("\n").length;
    var caretTop = (line - 1) * lineHeight;
    var viewBottom = ta.scrollTop + ta.clientHeight - lineHeight * 1.5;
    if (caretTop > viewBottom) {
      ta.scrollTop = caretTop - ta.clientHeight + lineHeight * 2;
    }
    syncScroll();
  }

  function onEditorKeyDown(event) {
    var key = event.key;
    var mod = event.ctrlKey || event.metaKey;

    if (mod && key === "Enter") {
      event.preventDefault();
      runCode();
      return;
    }
    if (key === "Escape") {
      editorState.tabEscapes = true;
      return;
    }
    if (key === "Tab") {
      if (editorState.tabEscapes || event.ctrlKey || event.altKey || event.metaKey) {
        editorState.tabEscapes = false;
        return; // let focus move on
      }
      event.preventDefault();
      if (event.shiftKey) {
        dedentSelection();
      } else {
        indentSelection();
      }
      return;
    }
    if (key !== "Shift") {
      editorState.tabEscapes = false;
    }
    if (event.isComposing) {
      return;
    }
    if (key === "Enter" && !event.shiftKey && !event.altKey && !mod) {
      event.preventDefault();
      newlineWithIndent();
      return;
    }
    if (key === "Backspace" && !event.shiftKey && !event.altKey && !mod) {
      if (smartBackspace()) {
        event.preventDefault();
      }
    }
  }

  function onEditorInput() {
    updateGutter();
    saveCodeSoon();
  }

  // --------------------------------------------------------------- theme

  var THEMES = ["auto", "light", "dark"];
  var THEME_ICONS = { auto: "◐", light: "☀", dark: "☾" };

  function applyTheme(theme) {
    if (THEMES.indexOf(theme) === -1) {
      theme = "auto";
    }
    if (theme === "auto") {
      document.documentElement.removeAttribute("data-theme");
    } else {
      document.documentElement.setAttribute("data-theme", theme);
    }
    el.themeIcon.textContent = THEME_ICONS[theme];
    el.themeToggle.setAttribute("aria-label", "Colour theme: " + (theme === "auto" ? "automatic" : theme));
    el.themeToggle.title = "Colour theme: " + (theme === "auto" ? "follow system" : theme) + " (click to change)";
    el.themeToggle.setAttribute("data-theme-choice", theme);
  }

  function cycleTheme() {
    var current = el.themeToggle.getAttribute("data-theme-choice") || "auto";
    var next = THEMES[(THEMES.indexOf(current) + 1) % THEMES.length];
    storageSet(THEME_KEY, next === "auto" ? null : next);
    applyTheme(next);
  }

  // --------------------------------------------------------------- token

  function openTokenDialog(reason, isError) {
    el.tokenReason.textContent = reason;
    el.tokenReason.classList.toggle("is-error", !!isError);
    el.tokenInput.value = getToken();
    el.tokenForget.hidden = !getToken();
    var dialog = el.tokenDialog;
    if (typeof dialog.showModal === "function") {
      if (!dialog.open) {
        dialog.showModal();
      }
      el.tokenInput.focus();
    } else {
      // Very old browsers: fall back to a prompt.
      var value = window.prompt(reason + "\n\nToken:", "");
      if (value) {
        submitToken(value);
      }
    }
  }

  function closeTokenDialog() {
    if (el.tokenDialog.open) {
      el.tokenDialog.close();
    }
  }

  function submitToken(value) {
    value = String(value || "").trim();
    if (!value) {
      return;
    }
    storageSet(TOKEN_KEY, value);
    closeTokenDialog();
    hideError();
    state.reconnectDelay = RECONNECT_MIN_MS;
    connect();
  }

  function cancelTokenDialog() {
    closeTokenDialog();
    if (state.authRequired) {
      setStatus("auth", "Token required");
    }
    updateControls();
  }

  function readTokenFromUrl() {
    try {
      var params = new URLSearchParams(window.location.search);
      var token = params.get("token");
      if (token) {
        storageSet(TOKEN_KEY, token);
        params.delete("token");
        var query = params.toString();
        var clean = window.location.pathname + (query ? "?" + query : "") + window.location.hash;
        window.history.replaceState(null, "", clean);
      }
    } catch (e) {
      /* ignore */
    }
  }

  // ---------------------------------------------------------------- misc

  function copyOutput(which, button) {
    var text = (which === "stderr" ? el.stderr : el.stdout).textContent;
    function done(ok) {
      var original = "Copy";
      button.textContent = ok ? "Copied" : "Copy failed";
      setTimeout(function () {
        button.textContent = original;
      }, 1200);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () {
          done(true);
        },
        function () {
          done(false);
        }
      );
      return;
    }
    var scratch = document.createElement("textarea");
    scratch.value = text;
    scratch.setAttribute("readonly", "");
    scratch.style.position = "fixed";
    scratch.style.opacity = "0";
    document.body.appendChild(scratch);
    scratch.select();
    var ok = false;
    try {
      ok = document.execCommand("copy");
    } catch (e) {
      ok = false;
    }
    document.body.removeChild(scratch);
    done(ok);
  }

  function isMac() {
    var platform = (navigator.userAgentData && navigator.userAgentData.platform) || navigator.platform || "";
    return /mac|iphone|ipad/i.test(platform);
  }

  // ---------------------------------------------------------------- init

  function init() {
    applyTheme(storageGet(THEME_KEY) || "auto");
    readTokenFromUrl();

    if (isMac()) {
      el.runKbd.textContent = "⌘ ↵";
      el.runHintMod.textContent = "⌘";
    }

    var saved = storageGet(CODE_KEY);
    el.code.value = saved !== null ? (saved === " " ? "" : saved) : DEFAULT_CODE;
    updateGutter();

    el.code.addEventListener("keydown", onEditorKeyDown);
    el.code.addEventListener("input", onEditorInput);
    el.code.addEventListener("scroll", syncScroll);
    el.code.addEventListener("click", updateCursor);
    el.code.addEventListener("keyup", updateCursor);
    el.code.addEventListener("blur", function () {
      editorState.tabEscapes = false;
    });
    document.addEventListener("selectionchange", function () {
      if (document.activeElement === el.code) {
        updateCursor();
      }
    });

    el.run.addEventListener("click", runCode);
    el.reset.addEventListener("click", resetEpisode);
    el.reconnect.addEventListener("click", function () {
      state.reconnectDelay = RECONNECT_MIN_MS;
      connect();
    });
    el.errorDismiss.addEventListener("click", hideError);
    el.themeToggle.addEventListener("click", cycleTheme);
    el.tokenButton.addEventListener("click", function () {
      openTokenDialog("Set the access token used to connect to this server. Saving it reconnects and starts a new episode.", false);
    });

    el.tokenForm.addEventListener("submit", function (event) {
      event.preventDefault();
      submitToken(el.tokenInput.value);
    });
    el.tokenCancel.addEventListener("click", cancelTokenDialog);
    el.tokenDialog.addEventListener("cancel", function (event) {
      event.preventDefault();
      cancelTokenDialog();
    });
    el.tokenShow.addEventListener("change", function () {
      el.tokenInput.type = el.tokenShow.checked ? "text" : "password";
    });
    el.tokenForget.addEventListener("click", function () {
      storageSet(TOKEN_KEY, null);
      el.tokenInput.value = "";
      el.tokenForget.hidden = true;
      el.tokenInput.focus();
    });

    var copyButtons = document.querySelectorAll("button[data-copy]");
    for (var i = 0; i < copyButtons.length; i++) {
      (function (button) {
        button.addEventListener("click", function () {
          copyOutput(button.getAttribute("data-copy"), button);
        });
      })(copyButtons[i]);
    }

    // Ctrl/Cmd-Enter runs from anywhere on the page (outside dialogs).
    document.addEventListener("keydown", function (event) {
      if (event.defaultPrevented || el.tokenDialog.open) {
        return;
      }
      if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
        event.preventDefault();
        runCode();
      }
    });

    window.addEventListener("online", function () {
      if (!state.connected && !state.authRequired) {
        state.reconnectDelay = RECONNECT_MIN_MS;
        connect();
      }
    });

    window.addEventListener("pagehide", function () {
      if (state.ws && state.ws.readyState === WebSocket.OPEN) {
        try {
          send("close");
          state.ws.close(1000);
        } catch (e) {
          /* ignore */
        }
      }
    });

    connect();
  }

  init();
})();
