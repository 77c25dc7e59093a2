"""A deterministic corpus of chat requests for testing token estimates against real tokenizers.

``build_corpus(n=400, seed=12)`` returns ``n`` requests mixing English, Chinese, Japanese, Korean,
Arabic, Russian, code, JSON, emoji, tool schemas, tool calls and results, images (inline PNG/JPEG
headers of known sizes, detail high/low/auto, and URLs) and multi-turn conversations. Each
request is a ``CorpusRequest`` with LangChain messages, OpenAI-shaped tool schemas, a ``lang`` and
a ``kind``. Written for this project: no downloaded data.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

__all__ = ["CorpusRequest", "build_corpus", "png_data_url", "jpeg_data_url"]

_TEXT = {
    "en": [
        "The quarterly report shows revenue growth of 12% across all regions, driven mostly by new subscriptions.",
        "Please summarise the attached meeting notes and list the three decisions that were taken.",
        "Can you explain why the sky looks blue during the day but red at sunset?",
        "Our deployment failed at 03:14 UTC because the database migration timed out after 900 seconds.",
        "Write a short, friendly email declining the invitation, and suggest meeting next Tuesday instead.",
        "In 1858 the first transatlantic telegraph cable carried a message from Queen Victoria to President Buchanan.",
        "I'm not sure whether we should refactor the billing module now or after the release; what do you think?",
        "Customers in the EU must be able to export and delete their data within thirty days of a request.",
    ],
    "zh": [
        "请帮我总结一下这份季度报告的主要内容，并列出三个关键结论。",
        "今天北京的天气晴朗，最高气温二十五度，适合出去散步。",
        "我们的系统在凌晨三点因为数据库迁移超时而部署失败了。",
        "机器学习模型需要大量高质量的数据才能取得良好的效果。",
        "请用简单的语言解释一下什么是区块链技术，以及它的主要用途。",
        "这家餐厅的招牌菜是红烧肉和清蒸鱼，价格也比较实惠。",
    ],
    "ja": [
        "この資料を要約して、重要なポイントを三つ挙げてください。",
        "東京の桜は三月の終わりから四月の初めにかけて満開になります。",
        "新しいシステムの導入により、作業時間が大幅に短縮されました。",
        "お忙しいところ恐縮ですが、ご確認のほどよろしくお願いいたします。",
    ],
    "ko": [
        "이 보고서의 주요 내용을 요약하고 세 가지 결론을 알려 주세요.",
        "서울의 봄은 따뜻하고 벚꽃이 아름답게 핍니다.",
        "새로운 기능이 다음 주 화요일에 배포될 예정입니다.",
    ],
    "ar": [
        "يرجى تلخيص هذا التقرير وذكر ثلاث نتائج رئيسية.",
        "الطقس اليوم مشمس ودرجة الحرارة خمس وعشرون درجة مئوية.",
        "فشل النشر في الساعة الثالثة صباحا بسبب انتهاء مهلة ترحيل قاعدة البيانات.",
        "يحتاج نموذج التعلم الآلي إلى كمية كبيرة من البيانات عالية الجودة.",
        "نود أن نشكركم على تعاونكم المستمر ونتطلع إلى العمل معكم مجددا.",
    ],
    "ru": [
        "Пожалуйста, кратко изложите содержание отчёта и перечислите три главных вывода.",
        "Сегодня в Москве солнечно, температура воздуха около двадцати пяти градусов.",
        "Развёртывание завершилось ошибкой в три часа ночи из-за тайм-аута миграции базы данных.",
        "Модели машинного обучения нужны большие объёмы качественных данных.",
        "Мы благодарим вас за сотрудничество и надеемся на дальнейшую совместную работу.",
    ],
}

_CODE = [
    '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]
''',
    '''class LRUCache:
    def __init__(self, capacity):
        self.capacity = capacity
        self.data = OrderedDict()

    def get(self, key):
        if key not in self.data:
            return -1
        self.data.move_to_end(key)
        return self.data[key]
''',
    '''export async function fetchUser(id: string): Promise<User> {
  const res = await fetch(`/api/users/${encodeURIComponent(id)}`);
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  return (await res.json()) as User;
}
''',
    '''SELECT u.id, u.email, COUNT(o.id) AS orders
FROM users u LEFT JOIN orders o ON o.user_id = u.id
WHERE u.created_at >= DATE '2024-01-01'
GROUP BY u.id, u.email HAVING COUNT(o.id) > 3 ORDER BY orders DESC;
''',
    '''#include <stdio.h>
int main(void) {
    for (int i = 0; i < 10; ++i) { printf("%d\\n", i * i); }
    return 0;
}
''',
    '''fn parse(input: &str) -> Result<Vec<u32>, ParseIntError> {
    input.split(',').map(|s| s.trim().parse::<u32>()).collect()
}
''',
]

_EMOJI = ["🙂", "🚀", "✅", "🔥", "👍🏽", "🇫🇷", "👨‍👩‍👧"]

_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_orders", "description": "Search a customer's orders by status and date range.",
        "parameters": {"type": "object", "properties": {
            "customer_id": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "shipped", "delivered", "cancelled", "returned"],
                       "description": "Order status"},
            "since": {"type": "string", "description": "ISO date"},
            "limit": {"type": "integer", "description": "At most this many orders", "default": 20},
            "include_items": {"type": "boolean"}},
            "required": ["customer_id"]}}},
    {"type": "function", "function": {
        "name": "create_ticket", "description": "Open a support ticket.\nUse it only when the user asks for help.",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string", "description": "A one-line summary"},
            "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"]},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels"},
            "reporter": {"type": "object", "description": "Who reports it", "properties": {
                "name": {"type": "string", "description": "Full name"},
                "email": {"type": "string", "description": "Contact address"}},
                "required": ["email"]}},
            "required": ["title"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"},
            "from": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY", "CNY", "RUB", "AED", "KRW", "INR",
                                                "BRL", "CAD", "AUD", "CHF", "SEK", "NOK", "MXN"]},
            "to": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY", "CNY", "RUB", "AED", "KRW", "INR",
                                              "BRL", "CAD", "AUD", "CHF", "SEK", "NOK", "MXN"]}},
            "required": ["amount", "from", "to"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current UTC time.",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "翻译文本", "description": "把文本翻译成目标语言。",
        "parameters": {"type": "object", "properties": {
            "文本": {"type": "string", "description": "要翻译的内容"},
            "目标语言": {"type": "string", "enum": ["英语", "日语", "俄语"]}}, "required": ["文本"]}}},
]


@dataclass
class CorpusRequest:
    """One request: messages, tool schemas, and labels for reporting."""

    messages: list[BaseMessage]
    tools: list[dict[str, Any]] = field(default_factory=list)
    lang: str = "en"
    kind: str = "chat"
    images: list[tuple[int, int, str, bool]] = field(default_factory=list)  # (width, height, detail, inline)


def _png_bytes(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # One (wrong-sized) IDAT: estimators read the header only; no provider sees these bytes.
    body = random.Random(width * 7919 + height).randbytes(1500)  # a few KB, as real images are
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def png_data_url(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(width, height)).decode()


def _jpeg_bytes(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    exif = b"\xff\xe1" + struct.pack(">H", 2 + 600) + b"Exif\x00\x00" + b"\x00" * 594
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    scan = b"\xff\xda" + struct.pack(">H", 12) + b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    body = random.Random(width * 7919 + height).randbytes(1500).replace(b"\xff", b"\x00")
    return b"\xff\xd8" + app0 + exif + sof + scan + body + b"\xff\xd9"


def jpeg_data_url(width: int, height: int) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(_jpeg_bytes(width, height)).decode()


def _text(rng: random.Random, lang: str, sentences: int) -> str:
    pool = _TEXT[lang]
    parts = []
    for _ in range(sentences):
        s = rng.choice(pool)
        if rng.random() < 0.15:
            s += " " + rng.choice(_EMOJI)
        if rng.random() < 0.2:
            s += f" ({rng.randint(1, 99999)})"
        parts.append(s)
    sep = "" if lang in ("zh", "ja") and rng.random() < 0.5 else " "
    text = sep.join(parts)
    if rng.random() < 0.3:
        text = text.replace(". ", ".\n\n", 2)
    return text


def _json_doc(rng: random.Random) -> str:
    doc = {
        "id": rng.randint(1, 10**9), "name": rng.choice(["Ada", "Linus", "Grace", "Алексей", "李雷", "سارة"]),
        "tags": rng.sample(["alpha", "beta", "prod", "eu", "billing", "vip", "trial"], 3),
        "orders": [{"sku": f"SKU-{rng.randint(100, 999)}", "qty": rng.randint(1, 9),
                    "price": round(rng.uniform(1, 500), 2)} for _ in range(rng.randint(1, 6))],
        "active": rng.random() < 0.5, "note": None,
    }
    return json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))


def _langs(rng: random.Random) -> str:
    return rng.choice(["en", "en", "en", "zh", "ja", "ko", "ar", "ru"])


def _user_content(rng: random.Random, kind: str, lang: str, size: int) -> str:
    if kind == "code":
        code = "\n".join(rng.choice(_CODE) for _ in range(max(1, size // 2)))
        return f"{_text(rng, lang, 1)}\n\n```\n{code}```"
    if kind == "json":
        docs = "\n".join(_json_doc(rng) for _ in range(max(1, size // 2)))
        return f"{_text(rng, lang, 1)}\n{docs}"
    return _text(rng, lang, size)


def build_corpus(n: int = 400, seed: int = 12) -> list[CorpusRequest]:
    """``n`` requests, the same for the same seed; every kind and language appears."""
    rng = random.Random(seed)
    kinds = ["chat", "chat", "long", "code", "json", "tools", "multi_turn", "tool_turns", "image", "mixed"]
    out: list[CorpusRequest] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        lang = _langs(rng) if i >= len(_TEXT) * len(kinds) else list(_TEXT)[(i // len(kinds)) % len(_TEXT)]
        system = SystemMessage(_text(rng, lang if rng.random() < 0.3 else "en", rng.randint(1, 3))) \
            if rng.random() < 0.6 else None
        msgs: list[BaseMessage] = [system] if system else []
        req = CorpusRequest(msgs, lang=lang, kind=kind)
        if kind in ("chat", "code", "json"):
            msgs.append(HumanMessage(_user_content(rng, kind, lang, rng.randint(1, 8))))
        elif kind == "long":
            msgs.append(HumanMessage(_user_content(rng, rng.choice(["chat", "code", "json"]), lang,
                                                   rng.randint(40, 160))))
        elif kind == "mixed":
            other = rng.choice([x for x in _TEXT if x != lang])
            content = _text(rng, lang, 3) + "\n" + _text(rng, other, 3) + "\n" + rng.choice(_CODE)
            msgs.append(HumanMessage(content))
            req.lang = f"{lang}+{other}"
        elif kind == "tools":
            req.tools = rng.sample(_TOOLS, rng.randint(1, len(_TOOLS)))
            msgs.append(HumanMessage(_text(rng, lang, rng.randint(1, 4))))
        elif kind == "multi_turn":
            for _ in range(rng.randint(2, 6)):
                msgs.append(HumanMessage(_user_content(rng, rng.choice(["chat", "chat", "code"]), lang,
                                                       rng.randint(1, 5))))
                msgs.append(AIMessage(_text(rng, lang, rng.randint(1, 6))))
            msgs.append(HumanMessage(_text(rng, lang, rng.randint(1, 3))))
        elif kind == "tool_turns":
            req.tools = rng.sample(_TOOLS[:5], rng.randint(1, 4))
            msgs.append(HumanMessage(_text(rng, lang, rng.randint(1, 3))))
            for _ in range(rng.randint(1, 3)):
                tool = rng.choice(req.tools)["function"]
                call_id = "".join(rng.choice("abcdefghijABCDEFGHIJ0123456789") for _ in range(9))
                args = {k: (rng.randint(1, 50) if v.get("type") in ("integer", "number")
                            else rng.choice(v["enum"]) if "enum" in v else _text(rng, lang, 1)[:40])
                        for k, v in tool["parameters"]["properties"].items() if v.get("type") != "object"}
                msgs.append(AIMessage("", tool_calls=[{"name": tool["name"], "args": args, "id": call_id}]))
                msgs.append(ToolMessage(_json_doc(rng) if rng.random() < 0.5 else _text(rng, lang, 2),
                                        tool_call_id=call_id))
            msgs.append(AIMessage(_text(rng, lang, rng.randint(1, 3))))
            msgs.append(HumanMessage(_text(rng, lang, 1)))
        elif kind == "image":
            blocks: list[Any] = [{"type": "text", "text": _text(rng, lang, rng.randint(1, 3))}]
            for _ in range(rng.randint(1, 3)):
                w, h = rng.choice([(512, 512), (1024, 768), (1920, 1080), (4000, 3000), (300, 2000), (64, 64),
                                   (2048, 4096), (800, 600)])
                detail = rng.choice(["high", "low", "auto"])
                shape = rng.random()
                url = png_data_url(w, h) if rng.random() < 0.6 else jpeg_data_url(w, h)
                if shape < 0.1:
                    blocks.append({"type": "image_url", "image_url": {"url": f"https://example.com/{w}x{h}.png",
                                                                      "detail": detail}})
                    req.images.append((w, h, detail, False))
                    continue
                if shape < 0.7:
                    blocks.append({"type": "image_url", "image_url": {"url": url, "detail": detail}})
                else:
                    mime, data = url[5:].split(";base64,")
                    blocks.append({"type": "image", "base64": data, "mime_type": mime})
                    detail = "auto"
                req.images.append((w, h, detail, True))
            msgs.append(HumanMessage(blocks))
        out.append(req)
    return out
