// chatforge web chat: plain JavaScript, no build step, no dependencies.
//
// Answers stream from the OpenAI-compatible /v1/chat/completions (fetch + ReadableStream over its
// server-sent events); conversations, thumbs and comparisons are kept through the /api/ routes.
// Requests never ask for more than the model's context holds: max_tokens is fitted to the context length
// /v1/models reports, and every request lets the server leave out the oldest turns (truncation "auto").
// Every text that comes from a user or a model is put on the page with textContent, never as markup.
// Built-in tool calls the server ran for an answer (its `tool_results` deltas) show as small collapsible
// cards inside the answer, where they happened, and are stored with it (`tool_turns`).
// "Check a text" opens a panel that asks /v1/detect whether a pasted text carries the server's watermark;
// the model card from /v1/models says whether the server has one (`watermark`: its settings, or null).
'use strict';

(() => {
  const KEY_STORAGE = 'chatforge.apiKey';
  const SETTINGS_STORAGE = 'chatforge.settings';
  const DEFAULT_MODEL = 'chatforge';
  const DEFAULT_MAX_TOKENS = 256; // when the context is long enough, or unknown
  const DROPPED_HEADER = 'X-Chatforge-Dropped-Messages';
  const MAX_EXAMPLES = 6; // the empty page stays short
  const CARD_SUMMARY_CHARS = 48; // arguments and result in a card's one-line summary
  const VERDICTS = { watermarked: 'Watermarked', 'not watermarked': 'Not watermarked', 'too short': 'Too short to tell' };
  const NO_WATERMARK = 'This server does not watermark its answers (it was started without --watermark-key), '
    + 'so there is no watermark to check a text for.';

  const $ = (id) => document.getElementById(id);
  const state = {
    conversation: null, // {id, title, ...} once the first message is sent
    messages: [], // the shown branch, root first: {id, role, content, parent_id, siblings, rating, ...}
    busy: false,
    controller: null, // AbortController of the answer(s) being streamed
    compare: null, // {user, a, b, system, params, model} while a comparison waits for the user's choice
    view: 0, // counts switches of the shown conversation: work that outlives a switch leaves the page alone
    compareRun: 0, // counts comparisons started or discarded: a discarded one's answers are dropped
    contextLengths: {}, // model id -> context length in tokens, from /v1/models
    maxTokensChosen: false, // the Max tokens field holds a stored or typed value, not the page's default
    examples: [], // prompts the empty page offers (/api/examples)
    examplesSource: 'generic', // 'training': like the model's training prompts
    watermarks: {}, // model id -> its watermark's settings, or null: none (absent: the server did not say)
    detecting: false, // a check of the "check a text" panel is under way
  };

  // ---- small helpers -------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text; // text, never markup
    return node;
  }

  function button(label, className, onClick, title) {
    const node = el('button', className, label);
    node.type = 'button';
    if (title) {
      node.title = title;
      node.setAttribute('aria-label', title);
    }
    node.addEventListener('click', onClick);
    return node;
  }

  function setStatus(text, isError = false) {
    const status = $('status');
    status.textContent = text || '';
    status.classList.toggle('error', Boolean(isError && text));
  }

  function apiKey() {
    return localStorage.getItem(KEY_STORAGE) || '';
  }

  function headers(json) {
    const out = {};
    if (json) out['Content-Type'] = 'application/json';
    const key = apiKey();
    if (key) out.Authorization = `Bearer ${key}`;
    return out;
  }

  async function errorMessage(response) {
    let message = response.statusText || 'request failed';
    try {
      const body = await response.json();
      if (body && body.error) message = body.error.message || JSON.stringify(body.error);
      else if (body && body.detail) message = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
    } catch (e) {
      // not JSON: keep the status text
    }
    if (response.status === 401) message += ' (enter the API key under Settings)';
    return `${response.status}: ${message}`;
  }

  async function api(method, path, body) {
    const response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    return response.status === 204 ? null : response.json();
  }

  // ---- settings ------------------------------------------------------------------------------

  function numberField(id, parse) {
    const value = parse($(id).value);
    return Number.isFinite(value) ? value : undefined;
  }

  function currentSettings() {
    return {
      model: $('model').value || DEFAULT_MODEL,
      temperature: numberField('temperature', parseFloat),
      top_p: numberField('top-p', parseFloat),
      max_tokens: numberField('max-tokens', (v) => parseInt(v, 10)),
    };
  }

  function samplingParams() {
    const s = currentSettings();
    const params = {};
    for (const key of ['temperature', 'top_p', 'max_tokens']) if (s[key] !== undefined) params[key] = s[key];
    const ctx = contextLength();
    if (ctx && params.max_tokens !== undefined) params.max_tokens = Math.min(params.max_tokens, ctx - 1);
    return params;
  }

  // The selected model's context length in tokens, or undefined when the server did not say.
  function contextLength() {
    return state.contextLengths[$('model').value];
  }

  // Half the context: a first message and its answer fit together with room to spare.
  function defaultMaxTokens(ctx) {
    return ctx ? Math.max(1, Math.min(DEFAULT_MAX_TOKENS, Math.floor(ctx / 2))) : DEFAULT_MAX_TOKENS;
  }

  // Fit the Max tokens field to the model: the default that fits unless the user chose a value, and a chosen
  // value that could never fit (the answer must leave at least one prompt token) falls back to that default.
  function fitMaxTokens() {
    const field = $('max-tokens');
    const ctx = contextLength();
    if (!ctx) {
      field.removeAttribute('max');
      return;
    }
    field.max = String(Math.max(1, ctx - 1));
    const value = parseInt(field.value, 10);
    if (!state.maxTokensChosen || !(value >= 1 && value < ctx)) field.value = defaultMaxTokens(ctx);
  }

  function saveSettings() {
    const s = currentSettings();
    s.system_prompt = $('system-prompt').value;
    s.compare = $('compare-mode').checked;
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(s));
  }

  function applySettings(s) {
    if (!s) return;
    if (typeof s.system_prompt === 'string') $('system-prompt').value = s.system_prompt;
    if (s.temperature !== undefined) $('temperature').value = s.temperature;
    if (s.top_p !== undefined) $('top-p').value = s.top_p;
    if (s.max_tokens !== undefined) {
      $('max-tokens').value = s.max_tokens;
      state.maxTokensChosen = true;
    }
    if (typeof s.compare === 'boolean') $('compare-mode').checked = s.compare;
    if (s.model) selectModel(s.model);
    fitMaxTokens(); // a setting stored for another model, or by an older page, may not fit this one
  }

  function selectModel(id) {
    const select = $('model');
    if (![...select.options].some((o) => o.value === id)) select.append(new Option(id, id));
    select.value = id;
  }

  async function loadModels() {
    const select = $('model');
    const wanted = select.value || (JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || '{}').model);
    try {
      const response = await fetch('/v1/models', { headers: headers(false) });
      if (!response.ok) throw new Error(await errorMessage(response));
      const models = ((await response.json()).data || []).filter((m) => m && m.id);
      for (const m of models) {
        if (Number.isInteger(m.context_length) && m.context_length > 1) state.contextLengths[m.id] = m.context_length;
        if ('watermark' in m) state.watermarks[m.id] = m.watermark || null;
      }
      const ids = models.map((m) => m.id);
      select.replaceChildren(...ids.map((id) => new Option(id, id)));
      if (wanted && ids.includes(wanted)) select.value = wanted;
    } catch (e) {
      if (!select.options.length) select.append(new Option(DEFAULT_MODEL, DEFAULT_MODEL));
      setStatus(`models: ${e.message}`, true);
    }
    fitMaxTokens();
    updateDetectNote();
  }

  async function loadExamples() {
    try {
      const body = await api('GET', '/api/examples');
      state.examples = (body.examples || []).filter((t) => typeof t === 'string' && t.trim());
      state.examplesSource = body.source;
    } catch (e) {
      state.examples = []; // the page works without them; a missing key is reported by the other requests
    }
    if (!state.messages.length) render(); // only the empty page shows them; a streaming answer is left alone
  }

  // ---- server-sent events --------------------------------------------------------------------

  // Yield the data of each event of an SSE body (multi-line data joined by newlines).
  async function* sseData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        // line ends may be \r\n, \n or \r; a '\r' that ends the chunk may be half of a '\r\n': it waits
        buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, '\n').replace(/\r(?!$)/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split('\n').filter((line) => line.startsWith('data:'))
            .map((line) => line.slice(5).replace(/^ /, '')).join('\n');
          if (data) yield data;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // The number of characters (Unicode code points, as the server and the store count them) of `text`.
  function codePoints(text) {
    return Array.from(text).length;
  }

  // A built-in tool call the server ran, as the store keeps it: where in the answer it happened (`at`: code
  // points of the text before it) and which tool round it was part of.
  function toolTurn(item, at, round) {
    const fn = item.function || {};
    return {
      type: 'function',
      function: {
        name: typeof fn.name === 'string' ? fn.name : '',
        arguments: typeof fn.arguments === 'string' ? fn.arguments : JSON.stringify(fn.arguments ?? ''),
      },
      content: typeof item.content === 'string' ? item.content : JSON.stringify(item.content ?? ''),
      ok: item.ok !== false,
      at,
      round,
    };
  }

  // Stream one chat completion; onUpdate gets the whole answer so far and its tool turns. Never throws:
  // returns {text, turns, finish, stopped, error, dropped}, `dropped` counting the oldest messages the
  // server left out.
  async function streamChat(messages, onUpdate, signal) {
    const settings = currentSettings();
    // truncation 'auto': a chat longer than the context goes on without its oldest turns instead of failing
    const body = { model: settings.model, messages, stream: true, truncation: 'auto', ...samplingParams() };
    let text = '';
    let points = 0; // code points of text
    const turns = []; // built-in tool calls the server ran, with their results
    let rounds = 0;
    let finish = null;
    let dropped = 0;
    try {
      const response = await fetch('/v1/chat/completions', {
        method: 'POST', headers: headers(true), body: JSON.stringify(body), signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      dropped = parseInt(response.headers.get(DROPPED_HEADER), 10) || 0;
      for await (const data of sseData(response.body)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || 'the server reported an error');
        if (Number.isInteger(chunk.dropped_messages)) dropped = Math.max(dropped, chunk.dropped_messages);
        const choice = (chunk.choices || [])[0];
        if (!choice) continue;
        const delta = choice.delta || {};
        // a round of built-in calls the engine ran: before the text that follows it
        if (Array.isArray(delta.tool_results) && delta.tool_results.length) {
          for (const item of delta.tool_results) {
            if (item && typeof item === 'object') turns.push(toolTurn(item, points, rounds));
          }
          rounds += 1;
          onUpdate(text, turns);
        }
        if (typeof delta.content === 'string' && delta.content) {
          text += delta.content;
          points += codePoints(delta.content);
          onUpdate(text, turns);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (e) {
      if ((signal && signal.aborted) || e.name === 'AbortError') {
        return { text, turns, finish: 'stopped', stopped: true, dropped };
      }
      return { text, turns, finish, error: e, dropped };
    }
    return { text, turns, finish: finish || 'stop', dropped };
  }

  // A quiet note, not an error: the answer is fine, the model just did not see the start of the chat.
  function droppedNote(count) {
    const ctx = contextLength();
    const what = count === 1 ? '1 older message was' : `${count} older messages were`;
    return `${what} left out to fit the model's ${ctx ? `${ctx}-token ` : ''}context.`;
  }

  // ---- busy state ----------------------------------------------------------------------------

  function startBusy() {
    state.busy = true;
    state.controller = new AbortController();
    $('send').disabled = true;
    $('stop').disabled = false;
    document.body.classList.add('busy');
    return state.controller;
  }

  function endBusy() {
    state.busy = false;
    state.controller = null;
    $('send').disabled = false;
    $('stop').disabled = true;
    document.body.classList.remove('busy');
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  // ---- conversations -------------------------------------------------------------------------

  async function loadConversations() {
    let list;
    try {
      list = await api('GET', '/api/conversations');
    } catch (e) {
      setStatus(`conversations: ${e.message}`, true);
      return;
    }
    const current = state.conversation && state.conversation.id;
    $('conversations').replaceChildren(...list.map((c) => {
      const item = el('li', c.id === current ? 'active' : '');
      item.dataset.id = c.id;
      item.append(button(c.title || 'Untitled', 'open', () => openConversation(c.id)));
      item.append(button('×', 'delete', () => deleteConversation(c.id), 'Delete conversation'));
      return item;
    }));
  }

  function showConversation(conv) {
    state.conversation = conv;
    state.messages = conv.messages || [];
    $('title').textContent = conv.title || 'Untitled';
    render();
  }

  async function openConversation(id) {
    state.view += 1;
    stop();
    closeCompare();
    try {
      const conv = await api('GET', `/api/conversations/${id}`);
      $('system-prompt').value = conv.system_prompt || '';
      applySettings(conv.settings);
      showConversation(conv);
      setStatus('');
    } catch (e) {
      setStatus(e.message, true);
    }
    loadConversations();
  }

  // Show the stored state of conversation `id`, unless the user went to another one meanwhile.
  async function reloadConversation(id, view) {
    const conv = await api('GET', `/api/conversations/${id}`);
    if (state.view === view) showConversation(conv);
  }

  async function deleteConversation(id) {
    try {
      await api('DELETE', `/api/conversations/${id}`);
      if (state.conversation && state.conversation.id === id) newChat();
    } catch (e) {
      setStatus(e.message, true);
    }
    loadConversations();
  }

  function newChat() {
    state.view += 1;
    stop();
    closeCompare();
    state.conversation = null;
    state.messages = [];
    $('title').textContent = 'New chat';
    $('input').value = '';
    setStatus('');
    render();
    loadConversations();
    $('input').focus();
  }

  // Create the conversation on its first message; later, keep its system prompt and settings current.
  async function ensureConversation() {
    const body = { system_prompt: $('system-prompt').value, settings: currentSettings() };
    if (!state.conversation) {
      state.conversation = await api('POST', '/api/conversations', body);
    } else if (state.conversation.system_prompt !== body.system_prompt
               || JSON.stringify(state.conversation.settings) !== JSON.stringify(body.settings)) {
      state.conversation = await api('PATCH', `/api/conversations/${state.conversation.id}`, body);
    }
    return state.conversation.id;
  }

  function systemPrompt() {
    return $('system-prompt').value;
  }

  // The OpenAI messages an answer to `user` is made from: system turn, then the branch up to `user`.
  function requestMessages(user) {
    const index = state.messages.findIndex((m) => m.id === user.id);
    const turns = state.messages.slice(0, index + 1).map((m) => ({ role: m.role, content: m.content }));
    const system = systemPrompt();
    return system.trim() ? [{ role: 'system', content: system }, ...turns] : turns;
  }

  function truncateAfter(user) {
    const index = state.messages.findIndex((m) => m.id === user.id);
    state.messages = state.messages.slice(0, index + 1);
  }

  // ---- sending and answering -----------------------------------------------------------------

  async function send(event) {
    if (event) event.preventDefault();
    const text = $('input').value;
    if (!text.trim() || state.busy) return;
    closeCompare();
    setStatus('');
    startBusy(); // no second send while this one is stored
    let user;
    try {
      const conversationId = await ensureConversation();
      // after an unanswered user turn, the new one takes its place (a sibling), as user turns alternate with answers
      const last = state.messages[state.messages.length - 1];
      const parentId = !last ? null : last.role === 'user' ? last.parent_id : last.id;
      user = await api('POST', `/api/conversations/${conversationId}/messages`,
        { role: 'user', content: text, parent_id: parentId });
      if (last && last.role === 'user') state.messages.pop();
    } catch (e) {
      endBusy();
      setStatus(e.message, true);
      return;
    }
    $('input').value = '';
    state.messages.push({ ...user, siblings: [user.id], rating: 0 });
    if (!state.conversation.title) state.conversation.title = text;
    $('title').textContent = state.conversation.title || 'Untitled';
    loadConversations();
    await respond(user);
  }

  // Answer `user` (again): whatever went wrong before is past, so its error goes.
  function respond(user) {
    setStatus('');
    return $('compare-mode').checked ? compareAnswers(user) : answer(user);
  }

  // Send an example prompt as if the user had typed it.
  function sendExample(text) {
    if (state.busy) return;
    $('input').value = text;
    send();
  }

  async function answer(user) {
    const view = state.view;
    const conversationId = state.conversation.id;
    const controller = startBusy();
    truncateAfter(user);
    render();
    const bubble = el('div', 'msg assistant streaming');
    bubble.append(el('div', 'role', 'Assistant'));
    const content = el('div', 'content', '');
    bubble.append(content);
    $('messages').append(bubble);
    scrollDown();
    const messages = requestMessages(user);
    const params = samplingParams();
    const model = currentSettings().model;
    const system = systemPrompt();
    const result = await streamChat(messages, (text, turns) => {
      fillAnswer(content, text, turns);
      scrollDown();
    }, controller.signal);
    $('stop').disabled = true; // still busy until the answer is stored: the next turn must follow it
    if (result.error) setStatus(`answer: ${result.error.message}`, true);
    else if (result.stopped) setStatus('Stopped.');
    else if (!result.text.trim()) setStatus('The model gave an empty answer.', true);
    else if (result.dropped) setStatus(droppedNote(result.dropped));
    try {
      // an answer cut by an error is not kept: the user turn stays, to answer again
      if (result.text.trim() && !result.error) {
        await api('POST', `/api/conversations/${conversationId}/messages`, {
          role: 'assistant', content: result.text, parent_id: user.id, system, params, model,
          finish_reason: result.finish, tool_turns: result.turns,
        });
        await reloadConversation(conversationId, view);
      }
    } catch (e) {
      setStatus(e.message, true);
    } finally {
      endBusy();
      render();
    }
  }

  function regenerate(message) {
    const index = state.messages.findIndex((m) => m.id === message.id);
    const user = state.messages[index - 1];
    if (!user || state.busy) return;
    respond(user);
  }

  async function selectBranch(messageId) {
    if (state.busy) return;
    try {
      showConversation(await api('POST', `/api/conversations/${state.conversation.id}/branch`,
        { message_id: messageId }));
    } catch (e) {
      setStatus(e.message, true);
    }
  }

  async function rate(message, value) {
    const rating = message.rating === value ? 0 : value;
    try {
      await api('PUT', `/api/messages/${message.id}/rating`, { rating });
      message.rating = rating;
      render();
    } catch (e) {
      setStatus(e.message, true);
    }
  }

  // ---- compare mode --------------------------------------------------------------------------

  function choiceButtons() {
    return [$('prefer-a'), $('prefer-b'), $('prefer-tie')];
  }

  function closeCompare() {
    state.compareRun += 1;
    state.compare = null;
    $('compare').hidden = true;
    $('answer-a').textContent = '';
    $('answer-b').textContent = '';
    for (const b of choiceButtons()) b.disabled = true;
  }

  async function compareAnswers(user) {
    const view = state.view;
    closeCompare();
    const run = state.compareRun;
    const controller = startBusy();
    truncateAfter(user);
    render();
    $('compare').hidden = false;
    const messages = requestMessages(user);
    const pending = {
      user, system: systemPrompt(), params: samplingParams(), model: currentSettings().model,
    };
    const show = (id) => (text, turns) => {
      fillAnswer($(id), text, turns);
    };
    const [a, b] = await Promise.all([
      streamChat(messages, show('answer-a'), controller.signal),
      streamChat(messages, show('answer-b'), controller.signal),
    ]);
    endBusy();
    if (state.view !== view || state.compareRun !== run) { // left this conversation, or discarded
      render();
      return;
    }
    const error = a.error || b.error;
    if (error) setStatus(`compare: ${error.message}`, true);
    else if (a.stopped || b.stopped) setStatus('Stopped.');
    else if (a.dropped || b.dropped) setStatus(droppedNote(Math.max(a.dropped, b.dropped)));
    if (!a.text.trim() || !b.text.trim()) {
      if (!error) setStatus('compare: an answer is empty; discard and try again', true);
      render();
      return;
    }
    state.compare = { ...pending, a: a.text, b: b.text, turnsA: a.turns, turnsB: b.turns };
    for (const btn of choiceButtons()) btn.disabled = false;
    render();
  }

  async function choose(choice) {
    const c = state.compare;
    if (!c) return;
    for (const b of choiceButtons()) b.disabled = true;
    try {
      const conversationId = state.conversation.id;
      await api('POST', '/api/comparisons', {
        conversation_id: conversationId, parent_id: c.user.id, answer_a: c.a, answer_b: c.b, choice,
        system: c.system, params: c.params, model: c.model, tool_turns_a: c.turnsA, tool_turns_b: c.turnsB,
      });
      closeCompare();
      await reloadConversation(conversationId, state.view);
      setStatus(choice === 'tie' ? 'Recorded: a tie.' : `Recorded: answer ${choice.toUpperCase()} is better.`);
    } catch (e) {
      for (const b of choiceButtons()) b.disabled = false;
      setStatus(e.message, true);
    }
  }

  // ---- check a text (POST /v1/detect) --------------------------------------------------------

  // The selected model's watermark as its card says: settings, null (the server has no key) or undefined.
  function servedWatermark() {
    return state.watermarks[$('model').value];
  }

  // Say what the panel can check; with no watermark on the server there is nothing to check, and it says so.
  function updateDetectNote() {
    const mark = servedWatermark();
    let note = "Paste a text to see whether it carries this server's watermark.";
    if (mark === null) note = NO_WATERMARK;
    else if (mark) note = `This server watermarks every answer (${mark.seeding_scheme}, gamma ${mark.gamma}). ${note}`;
    $('detect-note').textContent = note;
    $('detect-run').disabled = mark === null || state.detecting;
  }

  function toggleDetect() {
    const open = $('detect').hidden;
    $('detect').hidden = !open;
    $('detect-toggle').setAttribute('aria-expanded', String(open));
    if (open) {
      updateDetectNote();
      $('detect-input').focus();
    }
  }

  function fixed(x) {
    return Number.isFinite(x) ? x.toFixed(2) : String(x);
  }

  function pValue(p) {
    if (!Number.isFinite(p)) return String(p);
    return p !== 0 && p < 1e-3 ? p.toExponential(2) : p.toPrecision(3);
  }

  // A two-column list of [label, value] rows; every value is text.
  function detailRows(rows) {
    const list = el('dl', 'detect-detail');
    for (const [label, value] of rows) list.append(el('dt', '', label), el('dd', '', value));
    return list;
  }

  // One text's test: its verdict, z, p-value and tokens; for a long text also its most watermarked
  // passage (when that is not the whole text), quoted as text.
  function showDetection(result) {
    const verdict = el('p', `verdict ${result.verdict.replace(/ /g, '-')}`, VERDICTS[result.verdict] || result.verdict);
    verdict.id = 'detect-verdict';
    const parts = [verdict];
    if (result.z === null) {
      parts.push(el('p', 'note', result.message));
    } else {
      const share = `${(100 * result.green_fraction).toFixed(1)}%`;
      parts.push(detailRows([['z', `${fixed(result.z)} (threshold ${result.z_threshold})`],
        ['p-value', pValue(result.p_value)],
        ['Tokens scored', `${result.tokens_scored} (${result.green_tokens} green: ${share})`]]));
    }
    const best = result.window;
    if (best && best.tokens_scored < result.tokens_scored) {
      parts.push(el('h3', '', 'Most watermarked passage'), detailRows([
        ['Verdict', VERDICTS[best.verdict] || best.verdict], ['z', fixed(best.z)],
        ['p-value', `${pValue(best.corrected_p_value)} (corrected for ${best.windows_tried} passages tried)`],
        ['Tokens scored', String(best.tokens_scored)]]), el('blockquote', 'passage', best.text));
    }
    $('detect-result').replaceChildren(...parts);
  }

  // A failed check's message. A 400 on `key` means the server has no watermark key: the panel says so.
  async function detectError(response) {
    if (response.status === 400) {
      const body = await response.clone().json().catch(() => null);
      if (body && body.error && body.error.code === 'no_watermark_key') {
        state.watermarks[$('model').value] = null;
        return NO_WATERMARK;
      }
    }
    return errorMessage(response);
  }

  async function checkText() {
    const text = $('detect-input').value;
    const box = $('detect-result');
    if (!text.trim()) {
      box.replaceChildren(el('p', 'error', 'Paste a text to check first.'));
      return;
    }
    state.detecting = true;
    updateDetectNote();
    box.replaceChildren(el('p', 'note', 'Checking…'));
    try {
      const response = await fetch('/v1/detect', {
        method: 'POST', headers: headers(true), body: JSON.stringify({ input: text, windowed: true }),
      });
      if (!response.ok) throw new Error(await detectError(response));
      showDetection((await response.json()).data[0]);
    } catch (e) {
      box.replaceChildren(el('p', 'error', e.message));
    } finally {
      state.detecting = false;
      updateDetectNote();
    }
  }

  // ---- rendering -----------------------------------------------------------------------------

  function scrollDown() {
    const box = $('messages');
    box.scrollTop = box.scrollHeight;
  }

  const FINISH_NOTES = { stopped: 'stopped', length: 'cut at max tokens', content_filter: 'filtered' };

  function clip(text, limit = CARD_SUMMARY_CHARS) {
    const line = text.replace(/\s+/g, ' ').trim();
    return line.length > limit ? `${line.slice(0, limit - 1)}…` : line;
  }

  function parsedArguments(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      return undefined; // not JSON: shown as written
    }
  }

  // A call's arguments in a few words: the values of its argument object ("12*7"; "weekday, 2024-01-01").
  function shortArguments(text) {
    const args = parsedArguments(text);
    if (!args || typeof args !== 'object' || Array.isArray(args)) return text;
    return Object.values(args).map((v) => (typeof v === 'string' ? v : JSON.stringify(v))).join(', ');
  }

  // One built-in tool call as a collapsible card: "calculator · 12*7 → 84"; open, the call's name, its
  // arguments and its result (or error). Text only.
  function toolCard(turn, index) {
    const fn = turn.function || {};
    const name = fn.name || 'tool';
    const args = typeof fn.arguments === 'string' ? fn.arguments : JSON.stringify(fn.arguments ?? '');
    const result = typeof turn.content === 'string' ? turn.content : JSON.stringify(turn.content ?? '');
    const failed = turn.ok === false;
    const card = el('details', failed ? 'tool-card error' : 'tool-card');
    card.dataset.index = String(index);
    const summary = el('summary');
    if (failed) summary.append(el('span', 'tool-flag', '⚠ '));
    summary.append(el('span', 'tool-name', name), el('span', 'tool-args', ` · ${clip(shortArguments(args))}`),
      el('span', 'tool-arrow', ' → '), el('span', 'tool-result', clip(result)));
    summary.title = failed ? 'A tool call that failed: click for details' : 'A tool call: click for details';
    const parsed = parsedArguments(args);
    const details = el('dl', 'tool-detail');
    details.append(el('dt', '', 'Tool'), el('dd', 'tool-detail-name', name),
      el('dt', '', 'Arguments'),
      el('dd', 'tool-detail-args', parsed === undefined ? args : JSON.stringify(parsed, null, 2)),
      el('dt', '', failed ? 'Error' : 'Result'), el('dd', 'tool-detail-result', result));
    card.append(summary, details);
    return card;
  }

  // Put an answer's text into `node`, its tool cards where they happened (each turn's `at`: code points
  // of the text before it). Cards the user opened stay open while the answer streams on.
  function fillAnswer(node, text, turns) {
    if (!turns || !turns.length) {
      node.textContent = text;
      return;
    }
    const open = new Set([...node.children].filter((c) => c.tagName === 'DETAILS' && c.open)
      .map((c) => c.dataset.index));
    const chars = Array.from(text); // code points, as `at` counts them
    const parts = [];
    let done = 0;
    turns.forEach((turn, i) => {
      const at = Math.min(chars.length, Math.max(done, Number.isInteger(turn.at) ? turn.at : 0));
      if (at > done) parts.push(document.createTextNode(chars.slice(done, at).join('')));
      done = at;
      const card = toolCard(turn, i);
      if (open.has(String(i))) card.open = true;
      parts.push(card);
    });
    if (done < chars.length) parts.push(document.createTextNode(chars.slice(done).join('')));
    node.replaceChildren(...parts);
  }

  function renderMessage(message, isLast) {
    const node = el('div', `msg ${message.role}`);
    node.dataset.id = message.id;
    node.append(el('div', 'role', message.role === 'user' ? 'You' : 'Assistant'));
    const content = el('div', 'content');
    fillAnswer(content, message.content, message.tool_turns);
    node.append(content);
    const actions = el('div', 'actions');
    const siblings = message.siblings || [message.id];
    if (siblings.length > 1) {
      const at = siblings.indexOf(message.id);
      const prev = button('‹', 'branch-prev', () => selectBranch(siblings[at - 1]), 'Previous version');
      const next = button('›', 'branch-next', () => selectBranch(siblings[at + 1]), 'Next version');
      prev.disabled = at <= 0 || state.busy;
      next.disabled = at >= siblings.length - 1 || state.busy;
      actions.append(prev, el('span', 'branch-pos', `${at + 1}/${siblings.length}`), next);
    }
    if (message.role === 'assistant') {
      const up = button('▲ Good', 'thumb up', () => rate(message, 1), 'Thumbs up: good answer');
      const down = button('▼ Bad', 'thumb down', () => rate(message, -1), 'Thumbs down: bad answer');
      up.setAttribute('aria-pressed', String(message.rating === 1));
      down.setAttribute('aria-pressed', String(message.rating === -1));
      actions.append(up, down);
      if (isLast && !state.busy && !state.compare) {
        actions.append(button('↻ Regenerate', 'regenerate', () => regenerate(message), 'Regenerate this answer'));
      }
      const note = FINISH_NOTES[message.finish_reason];
      if (note) actions.append(el('span', 'note', `(${note})`));
    } else if (isLast && !state.busy && !state.compare) {
      actions.append(button('↻ Answer', 'retry', () => respond(message), 'Answer this message'));
    }
    if (actions.childNodes.length) node.append(actions);
    return node;
  }

  // What a newcomer sees: an invitation and a few example prompts, one click each to send.
  function emptyPage() {
    const box = el('div', 'empty');
    box.append(el('p', '', 'Send a message to start a conversation.'));
    const examples = state.examples.slice(0, MAX_EXAMPLES);
    if (!examples.length) return box;
    const intro = state.examplesSource === 'training' ? 'Or try one like those the model was trained on:'
      : 'Or try one of these:';
    box.append(el('p', 'examples-intro', intro));
    const list = el('div', 'examples');
    for (const text of examples) {
      const example = button(text, 'example', () => sendExample(text));
      example.disabled = state.busy;
      list.append(example);
    }
    box.append(list);
    return box;
  }

  function render() {
    const last = state.messages.length - 1;
    $('messages').replaceChildren(...state.messages.map((m, i) => renderMessage(m, i === last)));
    if (!state.messages.length) $('messages').append(emptyPage());
    for (const item of $('conversations').children) {
      item.classList.toggle('active', Boolean(state.conversation) && item.dataset.id === String(state.conversation.id));
    }
    scrollDown();
  }

  // ---- start ---------------------------------------------------------------------------------

  function init() {
    $('api-key').value = apiKey();
    applySettings(JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || 'null'));
    $('api-key').addEventListener('change', () => {
      const key = $('api-key').value.trim();
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
      setStatus('');
      loadModels();
      loadConversations();
      loadExamples();
    });
    // before the listeners that save the settings, so what is saved is what fits
    $('max-tokens').addEventListener('change', () => {
      state.maxTokensChosen = true;
      fitMaxTokens();
    });
    $('model').addEventListener('change', fitMaxTokens);
    $('model').addEventListener('change', updateDetectNote);
    $('detect-toggle').addEventListener('click', toggleDetect);
    $('detect-close').addEventListener('click', toggleDetect);
    $('detect-run').addEventListener('click', checkText);
    for (const id of ['model', 'system-prompt', 'temperature', 'top-p', 'max-tokens', 'compare-mode']) {
      $(id).addEventListener('change', saveSettings);
    }
    $('composer').addEventListener('submit', send);
    $('input').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) send(event);
    });
    $('stop').addEventListener('click', stop);
    $('new-chat').addEventListener('click', newChat);
    $('prefer-a').addEventListener('click', () => choose('a'));
    $('prefer-b').addEventListener('click', () => choose('b'));
    $('prefer-tie').addEventListener('click', () => choose('tie'));
    $('compare-cancel').addEventListener('click', () => {
      stop();
      closeCompare();
      render();
    });
    render();
    loadModels();
    loadConversations();
    loadExamples();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
