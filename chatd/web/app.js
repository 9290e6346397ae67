// A minimal client for the chat's WebSocket: every text message is one protocol line.
// Lines are shown as text only (textContent), never as HTML.
'use strict';
(function () {
  const log = document.getElementById('log');
  const form = document.getElementById('send');
  const input = document.getElementById('line');
  const prompt = document.getElementById('prompt');
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  const ws = new WebSocket(url);

  function show(text, kind) {
    const item = document.createElement('li');
    item.textContent = text;
    if (kind) item.className = kind;
    log.appendChild(item);
    item.scrollIntoView({ block: 'end' });
  }

  ws.addEventListener('message', function (event) {
    const line = String(event.data);
    if (line.startsWith('*** WELCOME ')) prompt.textContent = 'Message';
    show(line, line.startsWith('*** ') ? 'notice' : '');
  });
  ws.addEventListener('close', function (event) {
    show('disconnected (' + event.code + (event.reason ? ': ' + event.reason : '') + ')', 'notice');
  });
  form.addEventListener('submit', function (event) {
    event.preventDefault();
    if (ws.readyState === WebSocket.OPEN && input.value !== '') {
      ws.send(input.value);
      input.value = '';
    }
  });
})();
