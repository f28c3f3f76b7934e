"""The script every thermo page (live dashboard, report) carries, next to plotly.js.

Two things plotly does not do by itself:

- **Linked x axes.** All panels share the step axis: zooming or panning one sets the same step
  range on every other cartesian panel (the events table is left alone).
- **The user's view kept across live refreshes.** ``uirevision`` alone does not survive Dash 4:
  ``dcc.Graph`` copies every relayout (a zoom) into its ``figure`` prop and re-plots it, and that
  re-plot counts as the program setting the range, so the next figure from the server (no
  range) autoranges again. The script remembers, per graph, what the user set (x/y ranges from
  zoom and pan, the linear/log buttons, a double-click back to autorange) and applies it again
  after every ``Plotly.react`` that changed it, as a user edit (``Plotly._guiRelayout``).
"""

from __future__ import annotations

PAGE_JS = r"""
(function () {
  if (window.__thermoPage) return;
  window.__thermoPage = true;
  var busy = 0, views = new WeakMap();  // busy: our own edits in flight
  var AXIS = /^([xy]axis\d*)\.(range\[0\]|range\[1\]|range|autorange|type)$/;
  function edit(gd, update) {
    var P = window.Plotly;
    return Promise.resolve((P._guiRelayout || P.relayout)(gd, update));
  }
  function quietly(work) {
    busy++;
    var done = function () { busy--; };
    Promise.all(work()).then(done, done);
  }
  function cartesian(gd) {
    return gd._fullLayout && gd._fullLayout._has && gd._fullLayout._has('cartesian');
  }
  function xaxes(gd) {
    return Object.keys(gd._fullLayout || {}).filter(function (k) { return /^xaxis\d*$/.test(k); });
  }
  function remember(gd, ev) {
    var v = views.get(gd) || {};
    for (var k in ev) {
      if (k === 'updatemenus[0].active') { v[k] = ev[k]; continue; }
      var m = AXIS.exec(k);
      if (!m) continue;
      var ax = m[1], what = m[2];
      if (what === 'autorange') { if (ev[k]) delete v[ax + '.range']; }
      else if (what === 'range') v[ax + '.range'] = ev[k].slice();
      else if (what === 'type') { v[k] = ev[k]; delete v[ax + '.range']; }
      else {
        var r = (v[ax + '.range'] || ((gd.layout[ax] || {}).range || [null, null])).slice();
        r[what === 'range[0]' ? 0 : 1] = ev[k];
        v[ax + '.range'] = r;
      }
    }
    views.set(gd, v);
  }
  function current(gd, key) {
    var parts = key.replace('[0]', '.0').split('.'), o = gd.layout;
    for (var i = 0; i < parts.length && o !== undefined && o !== null; i++) o = o[parts[i]];
    return o;
  }
  function restore(gd) {
    var rev = gd.layout && gd.layout.uirevision;
    if (gd.__thermoRev !== rev) {  // the app changed what the graph shows (other rows): start over
      gd.__thermoRev = rev;
      views.delete(gd);
      return;
    }
    var v = views.get(gd), update = {}, n = 0;
    if (!v) return;
    for (var k in v) {
      if (JSON.stringify(current(gd, k)) !== JSON.stringify(v[k])) { update[k] = v[k]; n++; }
    }
    if (n) quietly(function () { return [edit(gd, update)]; });
  }
  function rangeOf(ev) {
    for (var k in ev) {
      var m = /^(xaxis\d*)\.range\[0\]$/.exec(k);
      if (m) return [ev[k], ev[m[1] + '.range[1]']];
      m = /^(xaxis\d*)\.range$/.exec(k);
      if (m && ev[k]) return ev[k].slice();
      if (/^xaxis\d*\.autorange$/.test(k) && ev[k]) return 'auto';
    }
    return null;
  }
  function linked(gd) {
    // Plotly.newPlot (which react falls back to) removes every listener: check, not a flag.
    var ev = gd._ev;
    return ev && ev.listeners && ev.listeners('plotly_relayout').indexOf(gd.__thermoRelayout) >= 0;
  }
  function link(gd) {
    if (!gd.on || !gd._ev || linked(gd)) return;
    if (!('__thermoRev' in gd)) gd.__thermoRev = gd.layout && gd.layout.uirevision;
    gd.on('plotly_buttonclicked', function (ev) {
      var args = ev && ev.button && ev.button.args;
      if (args && args[0]) remember(gd, Object.assign({'updatemenus[0].active': ev.active}, args[0]));
    });
    gd.on('plotly_react', function () { restore(gd); });
    gd.on('plotly_relayout', gd.__thermoRelayout = function (ev) {
      if (busy || !ev) return;
      remember(gd, ev);
      var r = rangeOf(ev);
      if (r === null) return;
      quietly(function () {
        return Array.prototype.slice.call(document.querySelectorAll('.js-plotly-plot'))
          .filter(function (g) { return g !== gd && cartesian(g); })
          .map(function (g) {
            var update = {};
            xaxes(g).forEach(function (a) {
              if (r === 'auto') update[a + '.autorange'] = true;
              else update[a + '.range'] = r;
            });
            remember(g, update);
            return edit(g, update);
          });
      });
    });
  }
  function scan() {
    Array.prototype.forEach.call(document.querySelectorAll('.js-plotly-plot'), link);
  }
  setInterval(scan, 300);
  document.addEventListener('DOMContentLoaded', scan);
})();
"""
