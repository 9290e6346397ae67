// The browser client of chatd. One WebSocket text message is one line of the chat protocol
// (docs/protocol.md); this file is the page's whole logic: naming, the room view, the online
// list, commands, pacing to the flood limit, and reconnecting with the name taken back.
//
// Safety rule: nothing that came from the network (or from the user) is ever parsed as HTML.
// Every piece of text reaches the DOM through textContent / createTextNode / setAttribute on
// data attributes; there is no innerHTML anywhere in this file.
'use strict';

(() => {
  // ---- Constants ------------------------------------------------------------------------

  /** First wait before reconnecting; doubled after each failure up to BACKOFF_MAX (ms). */
  const BACKOFF_START = 500;
  /** Longest wait between reconnection attempts (ms). */
  const BACKOFF_MAX = 30000;
  /** How long a reconnect without a token retries the old name while the server still holds it. */
  const RECLAIM_FOR = 60000;
  /** Failed connection attempts in a row after which the page says the server is gone. */
  const GONE_AFTER = 2;
  /** Lines kept in the input history. */
  const HISTORY_MAX = 500;
  /** Lines kept on screen; older ones are dropped from the top. */
  const SHOWN_MAX = 2000;
  /** Chat lines remembered to line up the history replayed after a reconnect. */
  const SEEN_MAX = 500;
  /** chatd's default `limits.max-line-length`, in bytes; the server closes the WebSocket
   *  (1009) on a longer message, so the page refuses such a line itself. */
  const MAX_LINE_BYTES = 2048;
  /** The server's default flood limit, assumed until its WELCOME says otherwise. */
  const DEFAULT_LIMITS = [5, 10];
  /** Scrolled within this many pixels of the end counts as "at the newest line". */
  const STICK_PX = 48;
  /** The commands Tab completes at the start of a line (chat-proto's COMMANDS). */
  const COMMANDS = ['/help', '/me', '/msg', '/nick', '/quit', '/token', '/who'];
  /** What the page adds to the server's /help answer. */
  const KEY_HELP = [
    'keys: Enter sends; Tab completes names and /commands (Tab with nothing to complete moves on);',
    'Up/Down recall what you sent; Escape jumps to the newest message.',
    'commands: /me ACTION, /msg NAME TEXT, /nick NEWNAME, /who, /token, /help, /quit; // sends a line starting with /',
  ];
  /** Close codes after which the page must not reconnect (ws-contract): kicked, banned, name
   *  reclaimed by a newer connection. 1000 (we quit) is handled apart. */
  const CLOSE_KICKED = 4000;
  const CLOSE_BANNED = 4001;
  const CLOSE_RECLAIMED = 4004;
  /** Name refusals: the name prompt stays open on the same connection. */
  const NAME_ERRORS = new Set(['name-invalid', 'name-reserved', 'name-taken', 'reclaim-refused', 'unavailable']);
  /** Refusals after which the server closes: shown, then the connection ends. */
  const FATAL_ERRORS = new Set(['server-full', 'too-many-connections', 'banned', 'name-timeout', 'flooding']);
  /** sessionStorage key of {name, token}: a reload of this tab takes the name back. */
  const STORE_KEY = 'chatd.session';

  // ---- Protocol: the same shapes as chat-proto's Event::parse ---------------------------

  /** Whether `s` could be a name on the wire. */
  const nameLike = (s) => s.length > 0 && !/[ :*>]/.test(s);

  /** `first rest` split at the first space. */
  const firstWord = (s) => {
    const i = s.indexOf(' ');
    return i < 0 ? [s, ''] : [s.slice(0, i), s.slice(i + 1)];
  };

  /** The reason in `<subject><marker><reason>)` (LEAVE and KICK); null if not in that form. */
  const bracketed = (rest, subject, marker) => {
    const head = subject + marker;
    return rest.startsWith(head) && rest.endsWith(')') && rest.length > head.length
      ? rest.slice(head.length, -1)
      : (rest === head + ')' ? '' : null);
  };

  /** A server line of a known kind in its kind's form; null otherwise. */
  function serverEvent(kind, rest) {
    const [subject, tail] = firstWord(rest);
    switch (kind) {
      case 'HELLO': return { type: 'hello', text: rest };
      case 'WELCOME': return { type: 'welcome', name: subject, text: tail };
      case 'MOTD': return { type: 'motd', text: rest };
      case 'HISTORY': return { type: 'history', when: subject, line: tail };
      case 'JOIN': {
        if (!rest.endsWith(' joined')) return null;
        const name = rest.slice(0, -' joined'.length);
        return nameLike(name) ? { type: 'join', name } : null;
      }
      case 'LEAVE': {
        const reason = nameLike(subject) ? bracketed(rest, subject, ' left (') : null;
        return reason === null ? null : { type: 'leave', name: subject, reason };
      }
      case 'NICK': {
        const head = subject + ' is now known as ';
        if (!nameLike(subject) || !rest.startsWith(head)) return null;
        const name = rest.slice(head.length);
        return nameLike(name) ? { type: 'nick', old: subject, name } : null;
      }
      case 'KICK': {
        const reason = nameLike(subject) ? bracketed(rest, subject, ' was kicked (') : null;
        return reason === null ? null : { type: 'kick', name: subject, reason };
      }
      case 'KICKED': return { type: 'kicked', reason: rest };
      case 'NOTICE': return { type: 'notice', text: rest };
      case 'WHO': {
        if (!/^\+?\d+$/.test(subject)) return null;
        return { type: 'who', count: Number(subject), names: tail.split(' ').filter((n) => n) };
      }
      case 'INFO': return { type: 'info', text: rest };
      case 'ERR': return { type: 'err', code: subject, text: tail };
      case 'BYE': return { type: 'bye', text: rest };
      case 'SHUTDOWN': return { type: 'shutdown', text: rest };
      case 'TOKEN': return { type: 'token', token: subject, text: tail };
      default: return null;
    }
  }

  /** One line from the server, typed by its shape (docs/protocol.md, "Line shapes"). */
  function parse(line) {
    if (line.startsWith('*** ')) {
      const [kind, rest] = firstWord(line.slice(4));
      return serverEvent(kind, rest) || { type: 'server', kind, text: rest };
    }
    if (line.startsWith('* ')) {
      const [name, text] = firstWord(line.slice(2));
      if (line.slice(2).includes(' ') && nameLike(name)) return { type: 'action', name, text };
    }
    const PRIVATE = ' (private): ';
    if (line.startsWith('-> ')) {
      const body = line.slice(3);
      const i = body.indexOf(PRIVATE);
      if (i >= 0 && nameLike(body.slice(0, i))) {
        return { type: 'privateEcho', name: body.slice(0, i), text: body.slice(i + PRIVATE.length) };
      }
    }
    let i = line.indexOf(PRIVATE);
    if (i >= 0 && nameLike(line.slice(0, i))) {
      return { type: 'private', name: line.slice(0, i), text: line.slice(i + PRIVATE.length) };
    }
    i = line.indexOf(': ');
    if (i >= 0 && nameLike(line.slice(0, i))) {
      return { type: 'chat', name: line.slice(0, i), text: line.slice(i + 2) };
    }
    return { type: 'other', text: line };
  }

  /** Characters chatd escapes in user text (chat-proto's `is_unsafe_char`). */
  const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]/g;

  /** Our own text as the server shows it to everyone else: unsafe characters made visible. */
  const sanitize = (s) => s.replace(UNSAFE, (c) => (c === '\t' ? ' '
    : '\\u{' + c.codePointAt(0).toString(16).padStart(4, '0') + '}'));

  /** What a typed line is, as chat-proto's `command::parse` reads it (only what the page needs). */
  function classify(line) {
    const trimmed = line.trim();
    if (!trimmed) return { kind: 'blank' };
    if (trimmed.toLowerCase() === 'quit') return { kind: 'quit' };
    if (line.startsWith('//')) return { kind: 'say', text: line.slice(1) };
    if (!trimmed.startsWith('/')) return { kind: 'say', text: line };
    const m = /^\/(\S*)\s*([\s\S]*)$/.exec(trimmed);
    const word = m[1].toLowerCase();
    const args = m[2].trim();
    switch (word) {
      case 'quit': case 'exit': return { kind: 'quit' };
      case 'help': return { kind: 'help' };
      case 'me': return args ? { kind: 'me', text: args } : { kind: 'command' };
      case 'token': return { kind: 'token' };
      default: return { kind: 'command' };
    }
  }

  /** The (rate, burst) at the end of a WELCOME text, or null. */
  function floodLimits(text) {
    const m = /at most (\d+) lines\/s, bursts of (\d+)/.exec(text);
    return m ? [Number(m[1]), Number(m[2])] : null;
  }

  // ---- The page's elements --------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const el = {
    app: $('app'), status: $('status'),
    join: $('join'), nameForm: $('name-form'), nameInput: $('name-input'),
    nameSubmit: $('name-submit'), nameError: $('name-error'), joinTitle: $('join-title'),
    room: $('room'), log: $('log'), messages: $('messages'), jump: $('jump'),
    peoplePanel: $('people-panel'), people: $('people'), peopleCount: $('people-count'),
    peopleToggle: $('people-toggle'), peopleCountShort: $('people-count-short'),
    ended: $('ended'), endedText: $('ended-text'), endedWhen: $('ended-when'),
    endedAction: $('ended-action'),
    sendForm: $('send-form'), input: $('input'), send: $('send'), hint: $('hint'),
  };

  // ---- State -----------------------------------------------------------------------------

  const S = {
    /** The current WebSocket (null when there is none). */
    ws: null,
    /** 'idle' (name prompt, no connection), 'naming' (connected, no name yet), 'chatting',
     *  'waiting' (lost, reconnecting after a pause), 'ended' (no automatic reconnect). */
    phase: 'idle',
    /** Our accepted name ('' before the first WELCOME). */
    me: '',
    /** The name line being tried (to tell the user what was refused). */
    tried: '',
    /** The reclaim token of the current connection (docs/protocol.md), never shown unasked. */
    token: null,
    /** A /token we sent ourselves is outstanding: its answer is kept, not shown. */
    awaitingToken: false,
    /** This connection is an automatic reconnect: its naming is done by the page. */
    auto: false,
    /** When the automatic retries of the plain name began (no token). */
    reclaimSince: 0,
    retryDelay: BACKOFF_START,
    backoff: BACKOFF_START,
    /** Failed connection attempts in a row (no WebSocket opened). */
    failures: 0,
    /** When the server was last reachable, for "gone since". */
    lastSeen: 0,
    reconnectAt: 0,
    timer: null,
    countdown: null,
    /** What the server said before closing: the close handler explains with it. */
    kicked: null, banned: null, fatal: null, shutdown: null, bye: false, quitting: false,
    opened: false,
    /** Online names, lower case → as shown. */
    people: new Map(),
    /** Sending pace (a token bucket a little stricter than the server's flood limit). */
    pace: { rate: 4, burst: 8, tokens: 8, last: 0, holdUntil: 0, queue: [], timer: null },
    /** Lines typed, for Up/Down. */
    history: [], histIndex: 0, draft: '',
    /** Tab completion in progress: {value, caret, start, candidates, index, suffix}. */
    completion: null,
    /** Unread lines below the visible part of the log. */
    unseen: 0,
    /** Unread lines while the tab is hidden, for the title. */
    unreadHidden: 0,
    /** Chat lines shown (in wire form), to line up a replayed history after a reconnect. */
    seen: [],
    /** HISTORY lines held until the replay is complete (then shown, minus what was seen). */
    replay: null,
    /** Every MOTD line shown, so a reconnect does not repeat them. */
    motdSeen: new Set(),
    greeted: false,
    /** WebSockets opened so far (the tests check that none is opened after a kick). */
    connections: 0,
  };

  // ---- Rendering ---------------------------------------------------------------------------

  const timeFmt = new Intl.DateTimeFormat(undefined, { hour: 'numeric', minute: '2-digit' });
  const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

  /** A colour class picked by a hash of the name (the same name, the same colour). */
  function colourOf(name) {
    let h = 0;
    for (const ch of name.toLowerCase()) h = (h * 31 + ch.codePointAt(0)) >>> 0;
    return 'c' + (h % 8);
  }

  /** Whether `text` mentions our name as a whole word. */
  function mentionsMe(text) {
    if (!S.me) return false;
    const lower = text.toLowerCase();
    const me = S.me.toLowerCase();
    const word = /[\p{L}\p{N}_.-]/u;
    for (let i = lower.indexOf(me); i >= 0; i = lower.indexOf(me, i + 1)) {
      const before = i === 0 ? '' : lower[i - 1];
      const after = lower.slice(i + me.length, i + me.length + 1);
      if (!word.test(before) && !(after && word.test(after))) return true;
    }
    return false;
  }

  /** Whether the log is scrolled to (near) its newest line. */
  const atBottom = () => el.log.scrollHeight - el.log.scrollTop - el.log.clientHeight <= STICK_PX;

  /** Whether the view follows the newest line: true unless the user scrolled up. Kept apart
   *  from atBottom() because a layout change (a banner, a narrower window) moves the end. */
  let following = true;
  /** Where the page itself last scrolled the log to: a position above it means the user
   *  scrolled up, even before the (asynchronous) scroll event says so. */
  let autoTop = 0;

  function scrollToNewest() {
    el.log.scrollTop = el.log.scrollHeight;
    autoTop = el.log.scrollTop;
    following = true;
    S.unseen = 0;
    el.jump.hidden = true;
  }

  /** Adds a finished line to the log: sticks to the newest line unless the user scrolled up,
   *  in which case the "new messages" button counts it. */
  function append(li, { force = false } = {}) {
    if (following && el.log.scrollTop < autoTop - STICK_PX && !atBottom()) following = false;
    const stick = force || following || atBottom();
    el.messages.append(li);
    while (el.messages.childElementCount > SHOWN_MAX) el.messages.firstElementChild.remove();
    if (stick) {
      scrollToNewest();
    } else {
      S.unseen += 1;
      el.jump.textContent = '';
      el.jump.append(`${S.unseen} new message${S.unseen === 1 ? '' : 's'} `);
      const arrow = document.createElement('span');
      arrow.setAttribute('aria-hidden', 'true');
      arrow.textContent = '↓';
      el.jump.append(arrow);
      el.jump.hidden = false;
    }
    if (document.hidden && !li.classList.contains('status')) {
      S.unreadHidden += 1;
      document.title = `(${S.unreadHidden}) chatd`;
    }
  }

  /** A log line: `kind` is its class; `when` a Date; `parts` text pieces or elements. */
  function line(kind, parts, { when = new Date(), from = null, own = false, history = false } = {}) {
    const li = document.createElement('li');
    li.className = 'line ' + kind;
    if (own) li.classList.add('own');
    if (history) li.classList.add('history');
    if (from !== null) li.dataset.from = from;
    const t = document.createElement('time');
    t.className = 'time';
    const valid = !Number.isNaN(when.getTime());
    if (valid) {
      t.dateTime = when.toISOString();
      t.textContent = timeFmt.format(when);
      t.title = fullFmt.format(when);
    }
    li.append(t, ' ');
    for (const p of parts) li.append(p);
    return li;
  }

  /** A name, isolated from the surrounding text's direction. */
  function who(name, extra = '') {
    const b = document.createElement('bdi');
    b.className = 'who ' + colourOf(name) + (extra ? ' ' + extra : '');
    b.textContent = name;
    return b;
  }

  /** User text: its own direction (dir=auto), long words wrapped by the stylesheet. */
  function body(text) {
    const s = document.createElement('span');
    s.className = 'text';
    s.dir = 'auto';
    s.textContent = text;
    return s;
  }

  function sep(text) {
    const s = document.createElement('span');
    s.className = 'sep';
    s.textContent = text;
    return s;
  }

  /** Shows a chat-shaped event (chat, action, private, echo); `history` for replayed lines. */
  function showMessage(e, { when, history = false, own = false } = {}) {
    const mine = own || (S.me && e.name && e.name.toLowerCase() === S.me.toLowerCase() && (e.type === 'chat' || e.type === 'action'));
    let li;
    switch (e.type) {
      case 'chat':
        li = line('chat', [who(e.name), sep(': '), body(e.text)], { when, from: e.name, own: mine, history });
        break;
      case 'action':
        li = line('action', [sep('* '), who(e.name), ' ', body(e.text)], { when, from: e.name, own: mine, history });
        break;
      case 'private':
        li = line('private', [who(e.name), sep(' (private): '), body(e.text)], { when, from: e.name, history });
        break;
      case 'privateEcho':
        li = line('private', [sep('→ '), who(e.name), sep(' (private): '), body(e.text)], { when, from: S.me, own: true, history });
        break;
      default:
        return;
    }
    if (!mine && e.type !== 'privateEcho' && mentionsMe(e.text)) li.classList.add('mention');
    append(li, { force: mine && !history });
    if (e.type === 'chat' || e.type === 'action') remember(e);
  }

  /** A line from the server that is not a message (joins, leaves, notices, errors...). */
  function notice(kind, parts, opts) {
    append(line(kind, parts.map((p) => (typeof p === 'string' ? body(p) : p)), opts));
  }

  /** The page's own status lines (connecting, lost, reconnected). */
  function status(text) {
    append(line('status', [body(text)]));
  }

  /** Remembers a chat line in the form the server stores it, to line up a later replay. */
  function remember(e) {
    S.seen.push(e.type === 'chat' ? `${e.name}: ${e.text}` : `* ${e.name} ${e.text}`);
    if (S.seen.length > SEEN_MAX) S.seen.splice(0, S.seen.length - SEEN_MAX);
  }

  function setStatus(text) {
    el.status.textContent = text;
  }

  // ---- Online list -----------------------------------------------------------------------

  function addPerson(name) {
    if (name) S.people.set(name.toLowerCase(), name);
  }

  function removePerson(name) {
    S.people.delete(name.toLowerCase());
  }

  function renderPeople() {
    const names = [...S.people.values()].sort((a, b) => a.localeCompare(b, undefined, { sensitivity: 'base' }));
    el.people.textContent = '';
    for (const name of names) {
      const li = document.createElement('li');
      const btn = document.createElement('button');
      btn.type = 'button';
      btn.className = 'person';
      btn.dataset.name = name;
      const me = S.me && name.toLowerCase() === S.me.toLowerCase();
      btn.append(who(name, me ? 'me' : ''));
      if (me) {
        btn.append(sep(' (you)'));
        btn.setAttribute('aria-label', `${name} (you)`);
      } else {
        btn.title = `Send ${name} a private message`;
        btn.setAttribute('aria-label', `${name}: send a private message`);
      }
      btn.addEventListener('click', () => {
        if (!me) {
          el.input.value = `/msg ${name} `;
        }
        el.app.classList.remove('people-open');
        el.peopleToggle.setAttribute('aria-expanded', 'false');
        el.input.focus();
      });
      li.append(btn);
      el.people.append(li);
    }
    if (!names.length) {
      const li = document.createElement('li');
      li.className = 'people-empty';
      li.textContent = S.phase === 'chatting' ? 'Nobody yet' : 'Not connected';
      el.people.append(li);
    }
    el.peopleCount.textContent = String(names.length);
    el.peopleCountShort.textContent = String(names.length);
  }

  /** Follows the room's membership from one server line (chat-client's Roster::observe). */
  function observePeople(e) {
    switch (e.type) {
      case 'who': S.people.clear(); e.names.forEach(addPerson); break;
      case 'join': case 'welcome': case 'chat': case 'action': case 'private': addPerson(e.name); break;
      case 'leave': case 'kick': removePerson(e.name); break;
      case 'nick': removePerson(e.old); addPerson(e.name); break;
      default: return;
    }
    renderPeople();
  }

  // ---- Views -----------------------------------------------------------------------------

  /** The name prompt; `error` says why the last name was refused. */
  function showJoin(error, prefill) {
    el.join.hidden = false;
    el.room.hidden = true;
    el.peopleToggle.hidden = true;
    el.joinTitle.textContent = S.me ? 'Choose a name to rejoin' : 'Join the room';
    el.nameError.textContent = error || '';
    el.nameInput.setAttribute('aria-invalid', error ? 'true' : 'false');
    el.nameSubmit.disabled = false;
    el.nameInput.disabled = false;
    if (prefill !== undefined) el.nameInput.value = prefill;
    el.nameInput.focus();
    el.nameInput.select();
  }

  function showRoom() {
    el.join.hidden = true;
    el.room.hidden = false;
    el.peopleToggle.hidden = false;
    el.ended.hidden = true;
    el.input.disabled = false;
    el.send.disabled = false;
    scrollToNewest();
  }

  /** The banner over the input: why the page is not connected (`text`, announced to screen
   *  readers when it changes), when it tries again (`when`, a countdown, not announced), and
   *  what the user can do about it (`action`). */
  function banner(text, action, when = '') {
    if (el.endedText.textContent !== text) el.endedText.textContent = text;
    el.endedWhen.textContent = when;
    el.ended.hidden = false;
    if (action) {
      el.endedAction.textContent = action.label;
      el.endedAction.onclick = action.run;
      el.endedAction.hidden = false;
    } else {
      el.endedAction.hidden = true;
      el.endedAction.onclick = null;
    }
  }

  // ---- Storage (this tab only) -------------------------------------------------------------

  function store() {
    try {
      sessionStorage.setItem(STORE_KEY, JSON.stringify({ name: S.me, token: S.token }));
    } catch (_) { /* storage may be disabled: reconnects still work from memory */ }
  }

  function unstore() {
    try { sessionStorage.removeItem(STORE_KEY); } catch (_) { /* see store() */ }
  }

  function stored() {
    try {
      const v = JSON.parse(sessionStorage.getItem(STORE_KEY) || 'null');
      return v && typeof v.name === 'string' ? v : null;
    } catch (_) {
      return null;
    }
  }

  // ---- Connection ------------------------------------------------------------------------

  const wsUrl = () => (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';

  /** Opens a connection that sends `nameLine` first. */
  function connect(nameLine) {
    clearTimers();
    S.kicked = null; S.banned = null; S.fatal = null; S.shutdown = null; S.bye = false;
    S.quitting = false; S.opened = false; S.awaitingToken = false; S.replay = null;
    S.tried = nameLine;
    S.phase = 'naming';
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (err) {
      onClose(null, { code: 1006, reason: String(err) });
      return;
    }
    S.ws = ws;
    S.connections += 1;
    ws.onopen = () => {
      if (ws !== S.ws) return;
      S.opened = true;
      S.failures = 0;
      S.lastSeen = Date.now();
      ws.send(S.tried);
    };
    ws.onmessage = (ev) => {
      if (ws !== S.ws || typeof ev.data !== 'string') return;
      onLine(ev.data);
    };
    ws.onclose = (ev) => onClose(ws, ev);
  }

  /** Sends a line now (the connection must be open). */
  function sendRaw(text) {
    if (S.ws && S.ws.readyState === WebSocket.OPEN) {
      S.ws.send(text);
      return true;
    }
    return false;
  }

  function clearTimers() {
    clearTimeout(S.timer);
    clearInterval(S.countdown);
    S.timer = null;
    S.countdown = null;
  }

  /** Tries `name` (from the prompt) on the open connection, or opens one for it. */
  function tryName(nameLine) {
    S.auto = false;
    if (S.ws && S.ws.readyState === WebSocket.OPEN && S.phase === 'naming') {
      S.tried = nameLine;
      sendRaw(nameLine);
    } else {
      connect(nameLine);
    }
  }

  /** Every line from the server. */
  function onLine(raw) {
    const e = parse(raw);
    if (S.replay && e.type !== 'history') flushReplay();
    observePeople(e);
    switch (e.type) {
      case 'hello':
        S.lastSeen = Date.now();
        if (!S.greeted) {
          S.greeted = true;
          notice('notice', [e.text]);
        }
        break;
      case 'welcome': onWelcome(e); break;
      case 'motd':
        // After a reconnect the same MOTD is not shown again.
        if (!S.motdSeen.has(e.text)) notice('motd', [e.text]);
        S.motdSeen.add(e.text);
        break;
      case 'history': {
        if (!S.replay) S.replay = [];
        S.replay.push(e);
        break;
      }
      case 'chat': case 'action': case 'private': case 'privateEcho':
        showMessage(e);
        break;
      case 'join': notice('notice', [who(e.name), ' joined']); break;
      case 'leave': notice('notice', [who(e.name), ` left (${e.reason})`]); break;
      case 'nick': {
        const mine = S.me && e.old.toLowerCase() === S.me.toLowerCase();
        notice('notice', [who(e.old), ' is now known as ', who(e.name)]);
        if (mine) {
          S.me = e.name;
          store();
          setStatus(`Connected as ${S.me}`);
          renderPeople();
        }
        break;
      }
      case 'kick': notice('notice', [who(e.name), ` was kicked (${e.reason})`]); break;
      case 'kicked':
        S.kicked = e.reason;
        notice('error', [`Disconnected by the server: ${e.reason}`]);
        break;
      case 'notice': notice('announce', [e.text]); break;
      case 'who':
        notice('info', [`Online (${e.count}): ${e.names.join(', ')}`]);
        break;
      case 'info': notice('info', [e.text]); break;
      case 'token':
        S.token = e.token;
        if (S.phase === 'chatting') store();
        if (S.awaitingToken) {
          S.awaitingToken = false; // our own request: a secret, never shown
        } else {
          notice('info', [`Your reclaim token (keep it secret): ${e.token}`]);
        }
        break;
      case 'err': onErr(e); break;
      case 'bye': S.bye = true; notice('notice', [e.text]); break;
      case 'shutdown':
        S.shutdown = e.text;
        notice('announce', [`The server is stopping: ${e.text}`]);
        break;
      default:
        notice('notice', [e.type === 'server' ? `${e.kind} ${e.text}` : e.text]);
    }
  }

  function onWelcome(e) {
    const again = S.me !== '';
    const sameName = again && S.me.toLowerCase() === e.name.toLowerCase();
    S.me = e.name;
    S.phase = 'chatting';
    S.auto = false;
    S.reclaimSince = 0;
    S.retryDelay = BACKOFF_START;
    S.backoff = BACKOFF_START;
    // A token belongs to one connection: this one asks for its own (below).
    S.token = null;
    S.people.clear();
    addPerson(S.me);
    renderPeople();
    store();
    setPace(floodLimits(e.text), 3);
    // The token (kept, never shown) lets a reconnect take the name back; /who fills the list.
    S.awaitingToken = sendRaw('/token');
    sendRaw('/who');
    showRoom();
    el.nameError.textContent = '';
    setStatus(`Connected as ${S.me}`);
    if (again) {
      status(sameName ? `Reconnected: you are ${S.me} again.` : `Reconnected as ${S.me}.`);
    } else {
      notice('notice', [`Welcome, `, who(S.me), `. Type /help for commands.`]);
    }
    el.input.focus();
  }

  function onErr(e) {
    if (S.phase === 'naming' && NAME_ERRORS.has(e.code)) {
      onNameRefused(e);
      return;
    }
    if (FATAL_ERRORS.has(e.code)) {
      if (e.code === 'banned') S.banned = e.text;
      else S.fatal = e;
      if (S.phase === 'chatting') notice('error', [`${e.code}: ${e.text}`]);
      return;
    }
    if (e.code === 'rate-limited') paceRefused(e.text);
    if (e.code === 'unknown-command' && S.awaitingToken) {
      // A server without reclaim tokens: reconnects retry the plain name instead.
      S.awaitingToken = false;
      return;
    }
    notice('error', [`${e.code}: ${e.text}`]);
  }

  /** The server refused a name (the connection stays open for another try). */
  function onNameRefused(e) {
    const wanted = S.auto ? S.me : nameOf(S.tried);
    if (S.auto) {
      // An automatic reconnect: retry while the server still holds the name for our dead
      // connection (no token) or cannot reach its cluster; otherwise ask the user.
      const noToken = !S.tried.startsWith('/reclaim ');
      const retry = (e.code === 'name-taken' && noToken && Date.now() - S.reclaimSince < RECLAIM_FOR)
        || e.code === 'unavailable';
      if (retry) {
        status(`The server still holds ${S.me} for the old connection; trying again in ${(S.retryDelay / 1000).toFixed(1)} s.`);
        const delay = S.retryDelay;
        S.retryDelay = Math.min(S.retryDelay * 2, 5000);
        S.timer = setTimeout(() => { if (S.phase === 'naming') sendRaw(S.tried); }, delay);
        return;
      }
      S.auto = false;
      status(`Could not take back the name ${S.me} (${e.code}): ${e.text}`);
      setStatus('Connected; choose a name');
      showJoin(`Could not take back the name: “${S.me}” ${describeRefusal(e)}`, S.me);
      return;
    }
    showJoin(`“${wanted}” ${describeRefusal(e)}`);
  }

  /** The name in a name line (`/reclaim NAME TOKEN` or `NAME`). */
  function nameOf(nameLine) {
    const m = /^\/reclaim\s+(\S+)/i.exec(nameLine);
    return m ? m[1] : nameLine;
  }

  /** A name refusal in words (after the name): what, then the server's own explanation. */
  function describeRefusal(e) {
    const what = {
      'name-taken': 'is taken',
      'name-invalid': 'is not a valid name',
      'name-reserved': 'is reserved',
      'reclaim-refused': 'is held by someone else now',
      unavailable: 'cannot be taken right now',
    }[e.code] || `was refused (${e.code})`;
    // The server ends its refusals with "; send another name": the form says that already.
    const why = e.text.replace(/;\s*send another name\.?$/i, '');
    return why ? `${what}: ${why}.` : `${what}.`;
  }

  /** The connection ended: explain why, then reconnect unless the page must not. */
  function onClose(ws, ev) {
    if (ws !== null && ws !== S.ws) return;
    S.ws = null;
    const phase = S.phase;
    const queued = S.pace.queue.length;
    S.pace.queue = [];
    clearTimeout(S.pace.timer);
    if (queued) status(`${queued} typed line${queued === 1 ? ' was' : 's were'} not sent.`);
    if (S.replay) flushReplay();

    // A ban made while online arrives as `*** KICKED banned ...` then 4001: the code decides.
    if (S.banned !== null || ev.code === CLOSE_BANNED) {
      const why = S.banned !== null ? S.banned : (S.kicked !== null ? S.kicked : ev.reason);
      setStatus('Banned');
      if (phase === 'naming' && !S.auto) {
        // A banned name (another may do) or address: said at the prompt.
        S.phase = 'idle';
        showJoin(`Banned${why ? `: ${why}` : ''}`);
        return;
      }
      end(`You are banned from this room${why ? ` (${why})` : ''}. The page will not rejoin.`);
      return;
    }
    if (ev.code === CLOSE_RECLAIMED) {
      end('Your name was taken over by a newer connection (another tab or device), so this page has stopped.',
        { label: 'Join again here', run: () => { el.ended.hidden = true; showJoin('', S.me); } });
      setStatus('Taken over');
      return;
    }
    if (S.kicked !== null || ev.code === CLOSE_KICKED) {
      const reason = S.kicked !== null ? S.kicked : ev.reason;
      end(`You were kicked from the room${reason ? `: ${reason}` : ''}. The page will not rejoin; reload it to join again.`);
      setStatus('Kicked');
      return;
    }
    if (phase === 'naming' && !S.auto && S.bye) {
      // `quit` typed at the name prompt: back to the prompt, no connection.
      S.phase = 'idle';
      setStatus('Not connected');
      showJoin('');
      return;
    }
    if (S.bye || S.quitting || ev.code === 1000) {
      end('You left the room.', { label: 'Join again', run: () => { el.ended.hidden = true; showJoin('', S.me); } });
      setStatus('Not connected');
      return;
    }
    if (phase === 'naming' && !S.auto && (ev.code === 4003 || (S.fatal && S.fatal.code === 'name-timeout'))) {
      // The prompt sat unanswered past the server's name timeout: the next Join connects
      // again, so there is nothing to report beyond "not connected".
      S.phase = 'idle';
      setStatus('Not connected');
      return;
    }
    if (phase === 'naming' && !S.auto) {
      // Before any name was accepted on this connection: say why, and let the user try again.
      S.phase = 'idle';
      el.nameSubmit.disabled = false;
      let why;
      if (S.fatal) why = `${S.fatal.code}: ${S.fatal.text}`;
      else if (!S.opened) why = 'could not connect to the chat server';
      else why = `the connection closed (${closeWhy(ev)})`;
      setStatus('Not connected');
      if (!S.opened) {
        S.failures += 1;
        probe().then((up) => {
          showJoin(up
            ? `The server answers but refused the chat connection (it may be full, or limit or ban your address). Try again later.`
            : `The server is gone: nothing answers at ${location.host}. Try again later.`);
        });
      } else {
        showJoin(`Could not join: ${why}`);
      }
      return;
    }
    if (phase === 'idle' || phase === 'ended') return;

    // Lost while chatting (or while reconnecting): come back after a pause.
    if (!S.opened) S.failures += 1;
    let why = S.shutdown !== null ? 'the server stopped' : closeWhy(ev);
    if (S.fatal) why = `${S.fatal.code}: ${S.fatal.text}`;
    if (phase === 'chatting') status(`Connection lost (${why}).`);
    scheduleReconnect(why);
  }

  /** A close in words. */
  function closeWhy(ev) {
    const known = {
      1001: 'the server is going away',
      1006: 'the connection dropped',
      1008: 'the server closed it (policy: flooding or bad input)',
      1009: 'a line was longer than the server accepts',
      1011: 'server error',
      4002: 'the page did not keep up with the room',
      4003: 'no name was given in time',
    }[ev.code];
    const text = known || `code ${ev.code}`;
    return ev.reason ? `${text}: ${ev.reason}` : text;
  }

  /** Whether the server answers HTTP at all (to tell "gone" from "refused"). */
  async function probe() {
    try {
      const r = await fetch('/', { method: 'HEAD', cache: 'no-store' });
      return r.ok || r.status > 0;
    } catch (_) {
      return false;
    }
  }

  /** The page stops here: no automatic reconnect. */
  function end(text, action) {
    clearTimers();
    S.phase = 'ended';
    S.auto = false;
    el.input.disabled = true;
    el.send.disabled = true;
    if (el.room.hidden) showRoom();
    el.input.disabled = true;
    el.send.disabled = true;
    banner(text, action);
    if (action) el.endedAction.focus();
    unstore();
    S.people.clear();
    renderPeople();
  }

  /** Waits (doubling up to BACKOFF_MAX), then reconnects and takes the name back. */
  function scheduleReconnect(why) {
    clearTimers();
    S.phase = 'waiting';
    const delay = S.backoff;
    S.backoff = Math.min(S.backoff * 2, BACKOFF_MAX);
    S.reconnectAt = Date.now() + delay;
    S.people.clear();
    renderPeople();
    if (el.room.hidden) showRoom();
    const gone = S.failures >= GONE_AFTER;
    // Whether the server answers plain HTTP (null: not asked): tells "nothing answers" from
    // "the server answers but refuses the chat connection".
    let answers = null;
    const tick = () => {
      const secs = Math.max(0, Math.ceil((S.reconnectAt - Date.now()) / 1000));
      const since = S.lastSeen ? ` since ${timeFmt.format(new Date(S.lastSeen))}` : '';
      let text = `Not connected (${why}).`;
      if (gone && answers === false) {
        text = `The server is gone: nothing answers at ${location.host}${since}.`;
      } else if (gone && answers === true) {
        text = 'The server answers but refuses the chat connection (it may be full, or limit or ban your address).';
      }
      banner(text, { label: 'Reconnect now', run: reconnectNow }, `Trying again in ${secs} s.`);
      setStatus(gone && answers === false ? 'Server unreachable' : 'Reconnecting…');
    };
    if (gone) {
      probe().then((up) => {
        answers = up;
        if (S.phase === 'waiting') tick();
      });
    }
    tick();
    S.countdown = setInterval(tick, 1000);
    S.timer = setTimeout(reconnectNow, delay);
  }

  /** Reconnects at once, sending `/reclaim NAME TOKEN` (or the plain name) as the name line. */
  function reconnectNow() {
    clearTimers();
    el.ended.hidden = true;
    setStatus('Reconnecting…');
    // The token stays until a new connection is welcomed: a failed attempt keeps using it.
    const nameLine = S.token ? `/reclaim ${S.me} ${S.token}` : S.me;
    if (!S.reclaimSince) S.reclaimSince = Date.now();
    S.auto = true;
    connect(nameLine);
  }

  // ---- Sending, paced to the flood limit ----------------------------------------------------

  /** A fresh bucket for a new connection on which `already` lines went out unpaced. */
  function setPace(limits, already) {
    const [rate, burst] = limits || DEFAULT_LIMITS;
    const p = S.pace;
    p.rate = Math.max(1, Math.floor((rate * 4) / 5));
    p.burst = Math.max(1, burst - 2);
    p.tokens = Math.max(0, p.burst - already);
    p.last = Date.now();
    p.holdUntil = 0;
    p.queue = [];
    clearTimeout(p.timer);
  }

  /** The server refused a line for flooding: adopt what it says and wait as long as it says. */
  function paceRefused(text) {
    const p = S.pace;
    const num = (re) => { const m = re.exec(text); return m ? Number(m[1]) : null; };
    const rate = num(/more than (\d+)/);
    const burst = num(/message-burst = (\d+)/);
    const retry = num(/retry in (\d+)/);
    if (rate) p.rate = Math.max(1, Math.min(p.rate, Math.floor((rate * 4) / 5)));
    else p.rate = Math.max(1, Math.floor((p.rate * 4) / 5));
    if (burst) p.burst = Math.max(1, Math.min(p.burst, burst - 2));
    p.tokens = 0;
    p.holdUntil = Date.now() + Math.min(retry === null ? 1000 : retry, 60000);
  }

  /** Sends queued lines as the bucket allows; sets a timer for the rest. */
  function pump() {
    const p = S.pace;
    clearTimeout(p.timer);
    p.timer = null;
    while (p.queue.length) {
      const now = Date.now();
      p.tokens = Math.min(p.burst, p.tokens + ((now - p.last) / 1000) * p.rate);
      p.last = now;
      if (now < p.holdUntil || p.tokens < 1) {
        const wait = Math.max(p.holdUntil - now, ((1 - p.tokens) / p.rate) * 1000, 10);
        p.timer = setTimeout(pump, wait);
        return;
      }
      p.tokens -= 1;
      const text = p.queue.shift();
      if (!sendRaw(text)) {
        p.queue.unshift(text);
        return;
      }
      echo(text);
    }
  }

  /** Shows our own line as the room sees it (the server does not send it back to us). */
  function echo(text) {
    const c = classify(text);
    if (c.kind === 'say') {
      showMessage({ type: 'chat', name: S.me, text: sanitize(c.text) }, { own: true });
    } else if (c.kind === 'me') {
      showMessage({ type: 'action', name: S.me, text: sanitize(c.text) }, { own: true });
    }
  }

  /** What the user typed and pressed Enter on. */
  function submit() {
    const text = el.input.value;
    const c = classify(text);
    if (c.kind === 'blank') return;
    if (S.phase !== 'chatting') {
      hint('Not connected: nothing was sent. The text stays here until you can send it.');
      return;
    }
    const bytes = new TextEncoder().encode(text).length;
    if (bytes > MAX_LINE_BYTES) {
      hint(`Too long to send: ${bytes} bytes, the server takes at most ${MAX_LINE_BYTES}. Nothing was sent.`);
      return;
    }
    rememberInput(text);
    el.input.value = '';
    hint('');
    if (c.kind === 'help') KEY_HELP.forEach((h) => notice('info', [h]));
    if (c.kind === 'quit') {
      S.quitting = true;
      unstore();
    }
    if (c.kind === 'token') S.awaitingToken = false;
    S.pace.queue.push(text);
    pump();
    if (S.pace.queue.length) hint(`Sending at the room's pace: ${S.pace.queue.length} waiting.`);
  }

  function hint(text) {
    el.hint.textContent = text;
  }

  // ---- History replay after a (re)join -------------------------------------------------------

  /** Shows the HISTORY lines of this join, minus those already on screen from before a drop. */
  function flushReplay() {
    const hist = S.replay || [];
    S.replay = null;
    // The replay is the room's last lines; those we saw before the drop are its start. Find
    // the longest start of the replay that is the end of what we saw, and show the rest.
    const lines = hist.map((h) => h.line);
    let skip = 0;
    if (S.seen.length) {
      for (let i = lines.length; i > 0; i -= 1) {
        const m = Math.min(i, S.seen.length);
        let same = true;
        for (let k = 0; k < m; k += 1) {
          if (lines[i - m + k] !== S.seen[S.seen.length - m + k]) { same = false; break; }
        }
        if (same) { skip = i; break; }
      }
    }
    const rest = hist.slice(skip);
    if (!rest.length) return;
    notice('status', [skip ? 'Missed while away:' : 'Earlier messages:']);
    for (const h of rest) {
      const inner = parse(h.line);
      const when = new Date(h.when);
      if (inner.type === 'chat' || inner.type === 'action') {
        showMessage(inner, { when, history: true });
      } else {
        notice('notice', [h.line], { when, history: true });
      }
    }
  }

  // ---- Input: history and completion -----------------------------------------------------------

  function rememberInput(text) {
    if (S.history[S.history.length - 1] !== text) S.history.push(text);
    if (S.history.length > HISTORY_MAX) S.history.shift();
    S.histIndex = S.history.length;
    S.draft = '';
  }

  function recall(step) {
    if (!S.history.length) return false;
    if (S.histIndex === S.history.length) S.draft = el.input.value;
    const next = Math.max(0, Math.min(S.history.length, S.histIndex + step));
    if (next === S.histIndex) return true;
    S.histIndex = next;
    el.input.value = next === S.history.length ? S.draft : S.history[next];
    const end = el.input.value.length;
    el.input.setSelectionRange(end, end);
    return true;
  }

  /** Tab: completes the /command or name before the caret; repeated Tab cycles. Returns
   *  false when there is nothing to complete (then Tab moves the focus, as usual). */
  function complete() {
    const v = el.input.value;
    const caret = el.input.selectionStart === null ? v.length : el.input.selectionStart;
    let c = S.completion;
    if (c && c.value === v && c.caret === caret) {
      c.index = (c.index + 1) % c.candidates.length;
    } else {
      let start = caret;
      while (start > 0 && !/\s/.test(v[start - 1])) start -= 1;
      const word = v.slice(start, caret);
      if (!word) return false;
      const lower = word.toLowerCase();
      let candidates;
      let suffix;
      if (start === 0 && word.startsWith('/')) {
        candidates = COMMANDS.filter((x) => x.startsWith(lower));
        suffix = ' ';
      } else {
        candidates = [...S.people.values()]
          .filter((n) => n.toLowerCase().startsWith(lower))
          .sort((a, b) => a.localeCompare(b, undefined, { sensitivity: 'base' }));
        suffix = start === 0 ? ': ' : ' ';
      }
      if (!candidates.length) return false;
      c = { start, tail: v.slice(caret), head: v.slice(0, start), candidates, index: 0, suffix };
      if (candidates.length > 1) hint(`Tab again for: ${candidates.join(', ')}`);
      else hint('');
    }
    const word = c.candidates[c.index] + c.suffix;
    const value = c.head + word + c.tail.replace(/^\s+/, '');
    const pos = c.head.length + word.length;
    el.input.value = value;
    el.input.setSelectionRange(pos, pos);
    c.value = value;
    c.caret = pos;
    S.completion = c;
    return true;
  }

  // ---- Wiring -----------------------------------------------------------------------------------

  el.nameForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = el.nameInput.value.trim();
    if (!name) {
      el.nameError.textContent = 'Type a name first.';
      el.nameInput.setAttribute('aria-invalid', 'true');
      el.nameInput.focus();
      return;
    }
    el.nameError.textContent = '';
    el.nameSubmit.disabled = true;
    setStatus(`Joining as ${name}…`);
    tryName(name);
    // Whatever happens next (welcome, refusal, close) enables the button again.
    setTimeout(() => { if (S.phase !== 'chatting') el.nameSubmit.disabled = false; }, 1500);
  });

  el.sendForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    submit();
  });

  el.input.addEventListener('keydown', (ev) => {
    if (ev.isComposing) return;
    if (ev.key === 'Tab' && !ev.shiftKey && !ev.altKey && !ev.ctrlKey && !ev.metaKey) {
      if (complete()) ev.preventDefault();
      return;
    }
    if (ev.key !== 'Shift') S.completion = null;
    if (ev.key === 'ArrowUp' && !ev.altKey && !ev.shiftKey) {
      if (recall(-1)) ev.preventDefault();
    } else if (ev.key === 'ArrowDown' && !ev.altKey && !ev.shiftKey) {
      if (recall(1)) ev.preventDefault();
    } else if (ev.key === 'Escape') {
      if (!el.jump.hidden) scrollToNewest();
      hint('');
    }
  });

  el.input.addEventListener('input', () => {
    S.completion = null;
    if (S.histIndex !== S.history.length) S.histIndex = S.history.length;
  });

  el.log.addEventListener('scroll', () => {
    following = atBottom();
    if (following) {
      S.unseen = 0;
      el.jump.hidden = true;
    }
  });

  // The log's box changes size (banner shown, window resized, phone keyboard): keep the
  // newest line in view if the view was following it.
  if (typeof ResizeObserver === 'function') {
    new ResizeObserver(() => {
      if (!following) return;
      el.log.scrollTop = el.log.scrollHeight;
      autoTop = el.log.scrollTop;
    }).observe(el.log);
  }

  el.jump.addEventListener('click', () => {
    scrollToNewest();
    el.input.focus();
  });

  el.peopleToggle.addEventListener('click', () => {
    const open = el.app.classList.toggle('people-open');
    el.peopleToggle.setAttribute('aria-expanded', open ? 'true' : 'false');
    if (open) {
      const first = el.people.querySelector('button');
      if (first) first.focus();
    }
  });

  el.peoplePanel.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && el.app.classList.contains('people-open')) {
      el.app.classList.remove('people-open');
      el.peopleToggle.setAttribute('aria-expanded', 'false');
      el.peopleToggle.focus();
    }
  });

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) {
      S.unreadHidden = 0;
      document.title = 'chatd';
    }
  });

  // Closing or reloading the tab: leave politely, so the room reads "quit", not "connection
  // lost". A reload joins again under the same name (below).
  window.addEventListener('pagehide', () => {
    if (S.phase === 'chatting') sendRaw('quit');
  });

  // The browser went back online: do not wait out the back-off.
  window.addEventListener('online', () => {
    if (S.phase === 'waiting') reconnectNow();
  });

  // A reload of this tab takes the name back at once; another visit only offers it.
  const saved = stored();
  const nav = performance.getEntriesByType('navigation')[0];
  if (saved && saved.name) {
    el.nameInput.value = saved.name;
    if (nav && nav.type === 'reload') {
      S.me = saved.name;
      S.token = saved.token || null;
      setStatus(`Joining as ${saved.name}…`);
      el.nameSubmit.disabled = true;
      reconnectNow();
    }
  }
  if (S.phase === 'idle') {
    setStatus('Not connected');
    el.nameInput.focus();
  }

  // For the browser tests and the curious: read-only views of the page's state, and the line
  // parser (tests/browser.rs holds it to chat-proto's Event::parse).
  Object.defineProperty(window, 'chatdPage', {
    value: Object.freeze({
      phase: () => S.phase,
      name: () => S.me,
      people: () => [...S.people.values()],
      connections: () => S.connections,
      parse,
    }),
  });
})();
