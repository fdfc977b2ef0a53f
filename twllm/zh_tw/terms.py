"""Mainland terms that OpenCC `s2twp` leaves alone, and the list the eval counts as mainland usage.

EXTRA_TERMS is applied after `s2twp`, only to segments detected as Simplified, so its keys are
written the way `s2twp` outputs them (公交车 → 公交車 → 公車). Every key is checked by
tests/unit/test_zh_tw.py to still survive `s2twp`: an entry OpenCC learns to convert itself
fails that test and is deleted here.

Policy for 質量: in Taiwan 質量 means physical mass and 品質 means quality; in mainland usage
质量 means both. A bare 質量 is therefore left alone (converting it would corrupt physics:
質量守恆, 物體的質量), and only collocations that can only mean quality are mapped (產品質量,
服務質量, 高質量, 質量問題 …). Likewise a bare 計算機 stays: in Taiwan it is the calculator and
the academic 計算機概論; s2twp already turns 计算机科学 into 電腦科學. 硬盘 needs no entry:
s2twp gives 硬碟.
"""

from __future__ import annotations

import re
from functools import cache

EXTRA_TERMS: dict[str, str] = {
    "公交車": "公車",
    "公交站": "公車站",
    "公交卡": "交通卡",
    "公交": "公車",
    "身份證": "身分證",
    "賬號": "帳號",
    "賬戶": "帳戶",
    "電子郵箱": "電子信箱",
    "郵箱": "信箱",
    "包郵": "免運",
    "自定義": "自訂",
    "外賣": "外送",
    "充值": "儲值",
    "西紅柿": "番茄",
    "三文魚": "鮭魚",
    "菠蘿": "鳳梨",
    "獼猴桃": "奇異果",
    "電飯煲": "電鍋",
    "點贊": "按讚",
    "營銷": "行銷",
    "智慧手機": "智慧型手機",
    "優盤": "隨身碟",
    "打車": "叫車",
    "計算機病毒": "電腦病毒",
    "產品質量": "產品品質",
    "服務質量": "服務品質",
    "教學質量": "教學品質",
    "醫療質量": "醫療品質",
    "資料質量": "資料品質",
    "空氣質量": "空氣品質",
    "睡眠質量": "睡眠品質",
    "生活質量": "生活品質",
    "高質量": "高品質",
    "質量問題": "品質問題",
    "質量管理": "品質管理",
    "質量控制": "品質控制",
    "質量檢測": "品質檢測",
    "質量保證": "品質保證",
    "質量好": "品質好",
    "質量差": "品質差",
    "質量不錯": "品質不錯",
}

# Mainland words in Traditional characters (the way a character-only conversion leaves them);
# mainland_terms() also finds their Simplified spelling. Words Taiwan shares (數據, 支持, 優化,
# 菜單, 點擊, 在線) are deliberately absent: counting them would flag good Taiwan answers.
MAINLAND_WORDS: tuple[str, ...] = (
    "軟件",
    "信息",
    "視頻",
    "服務器",
    "網絡",
    "數據庫",
    "默認",
    "硬盤",
    "內存",
    "鼠標",
    "打印機",
    "程序員",
    "短信",
    "博客",
    "互聯網",
    "屏幕",
    "人工智能",
    "出租車",
    "筆記本電腦",
    "激活",
    "文檔",
    "鏈接",
    "U盤",
)


@cache
def _extra_pattern() -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, sorted(EXTRA_TERMS, key=len, reverse=True))))


def apply_extra_terms(text: str) -> str:
    """Replace the EXTRA_TERMS keys in text that has already been through `s2twp`."""
    return _extra_pattern().sub(lambda m: EXTRA_TERMS[m.group(0)], text)
