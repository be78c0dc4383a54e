// Every pair of text elements that overlap inside one plotly figure of the page: titles, subtitles,
// axis titles, tick labels, colour bars, annotations, bar and cell text. Only figures that are shown
// (non-zero size) are checked. Returns [{figure, a, b}] (empty when nothing overlaps).
() => {
  const TOL = 1.0;
  const out = [];
  for (const fig of document.querySelectorAll('.js-plotly-plot')) {
    const box = fig.getBoundingClientRect();
    if (box.width === 0 || box.height === 0) continue;
    const owner = fig.closest('[id]');
    const items = [];
    for (const t of fig.querySelectorAll('svg.main-svg text')) {
      if (t.closest('.hoverlayer') || t.closest('.legend')) continue;
      const s = (t.textContent || '').trim();
      if (!s) continue;
      const style = getComputedStyle(t);
      if (style.display === 'none' || style.visibility === 'hidden' || style.opacity === '0') continue;
      const r = t.getBoundingClientRect();
      if (r.width === 0 || r.height === 0) continue;
      items.push({s, r, cls: (t.getAttribute('class') || '') + '/' + ((t.parentNode && t.parentNode.getAttribute && t.parentNode.getAttribute('class')) || '')});
    }
    for (let i = 0; i < items.length; i++) {
      for (let j = i + 1; j < items.length; j++) {
        const a = items[i].r, b = items[j].r;
        if (a.left < b.right - TOL && b.left < a.right - TOL && a.top < b.bottom - TOL && b.top < a.bottom - TOL) {
          out.push({figure: owner ? owner.id : '?', a: items[i].s + ' [' + items[i].cls + ']', b: items[j].s + ' [' + items[j].cls + ']'});
        }
      }
    }
  }
  return out;
}
